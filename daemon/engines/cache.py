"""Content-addressed engine cache.

An engine is keyed by what determines its bytes: the sha256 of the lowered ONNX and the
backend fingerprint (backend and version, device, DLA core, build options). A second,
cheaper index maps a *recipe* (source model bytes, calibration cache bytes, precision,
exclusions, lowering target) to the lowered ONNX's sha256, so a warm start finds its
engine without lowering again.

Layout under the cache root::

    entries/<key>/engine.<ext>    the artifact (ONNX Runtime: optimized .onnx; TensorRT: .plan)
    entries/<key>/meta.json       sha256, size, fingerprint, build report, last use
    recipes/<recipe key>.json     {"lowered_sha256": ...}
    timing/                       TensorRT timing caches, one per device and version
    tmp/                          build outputs before they are stored (emptied at start)

Entries are written into a temporary directory and renamed into place, so a crash leaves
either the whole entry or nothing; an entry whose artifact no longer matches its recorded
hash is deleted on lookup and rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calib.cache import atomic_write_text, sha256_file
from calib.files import fsync_dir
from daemon.errors import NoSpace
from daemon.telemetry import metrics

log = logging.getLogger("tegrad.engines.cache")

META = "meta.json"
# Bump when the lowering or the artifact layout changes in a way the recipe key cannot see.
LAYOUT_VERSION = 1


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def recipe_key(
    source_sha256: str,
    calibration_sha256: str | None,
    precision: str,
    exclude: list[str] | tuple[str, ...],
    exclude_precision: str,
    target: str,
) -> str:
    """Everything the lowered ONNX depends on, hashed."""
    parts = {
        "layout": LAYOUT_VERSION,
        "source": source_sha256,
        "calibration": calibration_sha256 or "",
        "precision": precision,
        "exclude": sorted(exclude) if precision in ("mixed", "fp16") else [],
        "exclude_precision": exclude_precision if precision == "mixed" else "",
        "target": target if precision in ("int8", "mixed") else "",
    }
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def engine_key(lowered_sha256: str, fingerprint: dict[str, str]) -> str:
    """sha256 of the lowered ONNX + the backend fingerprint: a new device or backend version changes it."""
    return hashlib.sha256(f"{lowered_sha256}|{_canonical(fingerprint)}".encode()).hexdigest()


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def no_space(directory: Path, needed: int) -> NoSpace:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = 0
    return NoSpace(f"no space left on the engine cache ({_size(free)} free, {_size(needed)} needed): "
                   "free some space there or point --engine-cache-dir at a larger file system")


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def room_for(directory: Path, needed: int):
    """Refuse to write about ``needed`` bytes into ``directory`` when they do not fit, and turn a
    full disk met while writing (an ENOSPC, or a writer's own error such as ONNX Runtime's
    "Protobuf serialization failed" with the disk found full) into NoSpace."""
    if shutil.disk_usage(directory).free < needed:
        raise no_space(directory, needed)
    try:
        yield
    except Exception as exc:
        if is_no_space(exc) or shutil.disk_usage(directory).free < needed:
            raise no_space(directory, needed) from None
        raise


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


@dataclass(frozen=True)
class Entry:
    key: str
    artifact: Path
    meta: dict[str, Any]


class EngineCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.entries = self.root / "entries"
        self.recipes = self.root / "recipes"
        self.timing = self.root / "timing"
        self.tmp = self.root / "tmp"
        for d in (self.entries, self.recipes, self.timing):
            d.mkdir(parents=True, exist_ok=True)
        # Left-overs of builds or stores that a crash interrupted.
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for stale in self.entries.glob(".incoming-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self._lock = threading.Lock()
        metrics.ENGINE_CACHE_BYTES.set(self.size())

    # -- recipes ------------------------------------------------------------------------------

    def lowered_sha(self, recipe: str) -> str | None:
        try:
            data = json.loads((self.recipes / f"{recipe}.json").read_text(encoding="utf-8"))
            sha = data["lowered_sha256"]
            return sha if isinstance(sha, str) and len(sha) == 64 else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember_recipe(self, recipe: str, lowered_sha256: str) -> None:
        _write_json(self.recipes / f"{recipe}.json", {"lowered_sha256": lowered_sha256})

    # -- entries ------------------------------------------------------------------------------

    def lookup(self, key: str) -> Entry | None:
        """The entry for ``key`` after checking its artifact against the recorded hash, or None."""
        folder = self.entries / key
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
            artifact = folder / meta["artifact"]
        except FileNotFoundError:
            metrics.ENGINE_CACHE_LOOKUPS.labels("miss").inc()
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._discard(folder, f"unreadable metadata ({exc})")
            return None
        try:
            ok = artifact.stat().st_size == meta["size"] and sha256_file(artifact) == meta["sha256"]
        except OSError:
            ok = False
        if not ok:
            self._discard(folder, "artifact does not match its recorded sha256 (truncated or modified)")
            return None
        meta["last_used"] = time.time()
        try:
            _write_json(folder / META, meta)
        except OSError as exc:  # a read-only cache still serves
            log.warning("engine cache: cannot record use of %s: %s", key[:16], exc)
        metrics.ENGINE_CACHE_LOOKUPS.labels("hit").inc()
        return Entry(key, artifact, meta)

    def _discard(self, folder: Path, why: str) -> None:
        log.warning("engine cache: deleting entry %s: %s; it will be rebuilt", folder.name[:16], why)
        metrics.ENGINE_CACHE_LOOKUPS.labels("corrupt").inc()
        shutil.rmtree(folder, ignore_errors=True)
        metrics.ENGINE_CACHE_BYTES.set(self.size())

    def store(self, key: str, artifact: Path, meta: dict[str, Any]) -> Entry:
        """Move a built artifact into the cache under ``key`` (whole entry or nothing)."""
        incoming = self.entries / f".incoming-{key}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()
        name = "engine" + artifact.suffix
        dst = incoming / name
        shutil.move(str(artifact), dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
        now = time.time()
        meta = {**meta, "key": key, "artifact": name, "size": dst.stat().st_size, "sha256": sha256_file(dst),
                "created": now, "last_used": now}
        _write_json(incoming / META, meta)
        final = self.entries / key
        with self._lock:
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.rename(incoming, final)
            fsync_dir(self.entries)
        metrics.ENGINE_CACHE_BYTES.set(self.size())
        return Entry(key, final / name, meta)

    def remove(self, key: str) -> None:
        """Delete the entry ``key`` (a version that no longer exists needs its engine no more)."""
        folder = self.entries / key
        if folder.is_dir():
            with self._lock:
                shutil.rmtree(folder, ignore_errors=True)
            log.info("engine cache: removed %s (no version uses it)", key[:16])
            metrics.ENGINE_CACHE_BYTES.set(self.size())

    def size(self) -> int:
        total = 0
        for path in self.entries.rglob("*"):
            try:
                if path.is_file():
                    total += path.stat().st_size
            except OSError:
                pass
        return total

    def evict(self, keep: set[str] = frozenset()) -> list[str]:
        """Delete least-recently-used entries until the cache fits ``max_bytes``; never those in ``keep``."""
        with self._lock:
            rows = []
            for folder in self.entries.iterdir():
                if folder.name.startswith("."):
                    continue
                try:
                    meta = json.loads((folder / META).read_text(encoding="utf-8"))
                    rows.append((float(meta.get("last_used", 0)), int(meta.get("size", 0)), folder))
                except (OSError, ValueError, TypeError):
                    rows.append((0.0, 0, folder))
            total = self.size()
            removed = []
            for _, size, folder in sorted(rows, key=lambda r: r[0]):
                if total <= self.max_bytes:
                    break
                if folder.name in keep:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                removed.append(folder.name)
                metrics.ENGINE_CACHE_EVICTIONS.inc()
                log.info("engine cache: evicted %s (%d bytes) to stay under %d bytes", folder.name[:16], size, self.max_bytes)
        metrics.ENGINE_CACHE_BYTES.set(self.size())
        return removed

    def timing_cache(self, fingerprint: dict[str, str]) -> Path:
        # Tactic timings depend on the device and the TensorRT version, not on the model's build options.
        device = {k: v for k, v in fingerprint.items() if k in ("backend", "version", "device", "compute_capability")}
        return self.timing / (hashlib.sha256(_canonical(device).encode()).hexdigest()[:32] + ".cache")

    def scratch(self) -> Path:
        """A fresh directory for one build's outputs, inside the cache so that store() is a rename."""
        path = self.tmp / f"build-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        return path
