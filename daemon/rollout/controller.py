"""The rollout intake: from a complete upload to a staged (or refused) version, then activation,
rollback, deletion and retention.

Staging runs one bundle at a time (engine builds compete for memory):
verify (signature, hashes, contents) → extract into ``<repo>/.staging/<op>/`` →
build through the engine factory → validate the golden samples → rename into
``<repo>/<model>/<version>`` → record STAGED (→ activate when asked). Nothing
reaches the repository before validation passed; a refused version keeps its
report in SQLite and nothing on disk. After a crash, :meth:`Rollouts.recover`
fails what was interrupted and removes its partial files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from calib.files import fsync_dir
from daemon import crashpoints
from daemon.engines.cache import is_no_space
from daemon.engines.factory import EngineFactory
from daemon.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted, TegradError
from daemon.repository import layout
from daemon.repository.manager import ModelManager
from daemon.repository.state import (
    ACTIVATING,
    ACTIVE,
    FAILED,
    INACTIVE,
    STAGED,
    STAGING,
    OperationRecord,
    RolloutVersion,
    StateStore,
)
from daemon.rollout import BundleError
from daemon.rollout.manifest import MANIFEST
from daemon.rollout.operations import ACTIVATING as OP_ACTIVATING
from daemon.rollout.operations import BUILDING, SUCCEEDED, VALIDATING, VERIFYING, OperationBoard
from daemon.rollout.operations import FAILED as OP_FAILED
from daemon.rollout.uploads import Uploads
from daemon.telemetry import metrics

log = logging.getLogger("tegrad.rollout")

_OP_STATE = {"extract": VERIFYING, "build": BUILDING, "validate": VALIDATING}


@dataclass
class RolloutOptions:
    trust_dir: Path | None
    allow_unsigned: bool = False
    keep_versions: int = 3
    auto_activate: bool = False
    max_bundle_bytes: int = 4 << 30
    # The embedded default repository lives inside the installed package: nothing is installed there.
    read_only: bool = False


class Rollouts:
    def __init__(self, root: Path, store: StateStore, manager: ModelManager, factory: EngineFactory,
                 uploads: Uploads, board: OperationBoard, options: RolloutOptions) -> None:
        self.root = root
        self.store = store
        self.manager = manager
        self.factory = factory
        self.uploads = uploads
        self.board = board
        self.options = options
        self._staging = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        if options.allow_unsigned:
            log.warning("ALLOW-UNSIGNED IS ON: this device installs bundles whose signature is missing or fails. "
                        "Anyone who can reach the admin API can install any model. Development only.")

    # -- start and stop ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Before models load: fail interrupted work and remove its partial files."""
        if self.store.lost is not None:
            self._rebuild_lost_state()
        done = self.store.recover()
        self.board.reload()
        for v in done.staging:
            # Renamed into the repository but not recorded STAGED: never validated as installed.
            shutil.rmtree(self.root / v.model / str(v.version), ignore_errors=True)
        for v in done.activating:
            log.warning("model %s version %d: activation was interrupted; the previous active version serves",
                        v.model, v.version)
        shutil.rmtree(layout.staging_root(self.root), ignore_errors=True)
        for v in self.store.rollout_versions():
            if v.report:
                metrics.set_validation_scores(v.model, str(v.version), _finite(v.report.get("scores", {})))
        for model in self.store.rollout_models():
            metrics.set_active_version(model, self.store.rollout_model(model)[0])

    def _rebuild_lost_state(self) -> None:
        """The state database was damaged and replaced (by its backup copy, or empty): record the
        bundle-installed versions the repository holds that the state does not know. They were
        validated (only those reach the repository) but whether one was active is not known, so
        they are held back as STAGED rather than served on a guess."""
        lost = self.store.lost
        found = []
        try:
            names = layout.model_names(self.root)
        except TegradError:  # missing or unreadable: the models' loads will say so
            names = []
        for model in names:
            known = {v.version for v in self.store.rollout_versions(model)}
            try:
                on_disk = layout.versions_on_disk(self.root / model, MANIFEST)
            except OSError:
                continue
            for version in sorted(set(on_disk) - known):
                self.store.set_rollout_state(model, version, STAGED,
                                             "recorded again from the repository after the state database was lost; "
                                             "activate it to serve it")
                found.append(f"{model} version {version}")
        if lost.restored:
            kept = "restored the copy saved at " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lost.restored)) \
                   + "; operations and state changes after it are lost"
        else:
            kept = "no sound copy to restore: the rollout history, validation reports, operations and which " \
                   "versions were active are lost"
        active = ", ".join(f"{m} version {self.store.rollout_model(m)[0]}" for m in self.store.rollout_models()
                           if self.store.rollout_model(m)[0])
        log.error("state database %s was unreadable (%s) and was moved aside to %s; %s; active versions now: %s; "
                  "bundle versions recorded again as STAGED: %s", self.store.path, lost.why, lost.moved_to.name, kept,
                  active or "none (the version policy chooses)", ", ".join(found) or "none")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- staging ----------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.options.read_only:
            raise FailedPrecondition("tegrad serves its embedded default repository, which rollouts "
                                     "do not change; start it with --model-repository DIR to install bundles")

    def stage(self, upload_sha: str, auto_activate: bool | None = None, *, source: str = "upload") -> OperationRecord:
        self._writable()
        path = self.uploads.bundle_path(upload_sha)
        auto = self.options.auto_activate if auto_activate is None else auto_activate
        op = self.board.create("stage", upload_sha256=upload_sha, auto_activate=auto)
        log.info("operation %s: staging %s (%s)%s", op.id, path.name, source, ", then activating" if auto else "")
        task = asyncio.ensure_future(self._run(op.id, path, auto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return op

    async def _run(self, op_id: str, path: Path, auto: bool) -> None:
        seconds: dict[str, float] = {}
        work = layout.staging_root(self.root) / op_id
        # The staging files go before the outcome is reported: whoever watches the operation
        # finish finds the repository as it will stay.
        try:
            try:
                async with self._staging:
                    version = await self._stage(op_id, path, work, seconds)
            finally:
                await asyncio.to_thread(shutil.rmtree, work, True)
            if auto:
                self.board.update(op_id, state=OP_ACTIVATING, progress="activating")
                seconds["activate"] = await self.activate(version.model, version.version)
            self.board.update(op_id, state=SUCCEEDED, progress="", stage_seconds=dict(seconds))
            self.uploads.discard(self.board.get(op_id).upload_sha256)
        except asyncio.CancelledError:
            shutil.rmtree(work, ignore_errors=True)  # the awaited removal may itself have been cancelled
            self._fail(op_id, "tegrad stopped before staging finished", seconds)
            raise
        except TegradError as exc:
            self._fail(op_id, str(exc), seconds)
        except OSError as exc:  # extracting or installing into the repository
            where = f" ({layout.relative(self.root, exc.filename)})" if exc.filename else ""
            why = "no space left on the model repository's file system" if is_no_space(exc) else exc.strerror or exc
            self._fail(op_id, f"staging stopped: {why}{where}", seconds)
        except Exception as exc:  # a bug must fail the operation, not leave it running forever
            log.exception("operation %s failed unexpectedly", op_id)
            self._fail(op_id, f"internal error: {type(exc).__name__}: {exc}", seconds)

    async def _stage(self, op_id: str, path: Path, work: Path, seconds: dict[str, float]) -> RolloutVersion:
        from daemon.rollout import signing
        from daemon.rollout.bundle import open_bundle
        from daemon.rollout.stage import stage

        self.board.update(op_id, state=VERIFYING, progress="checking signature, hashes and contents")
        start = time.monotonic()
        trust = signing.TrustStore(self.options.trust_dir) if self.options.trust_dir else None
        vb = await asyncio.to_thread(open_bundle, path, trust, allow_unsigned=self.options.allow_unsigned,
                                     max_bytes=self.options.max_bundle_bytes)
        seconds["verify"] = _observe("verify", start)
        m = vb.manifest
        self.board.update(op_id, model=m.model, version=m.version, stage_seconds=dict(seconds))
        self._check_new(m.model, m.version)
        self.store.set_rollout_state(
            m.model, m.version, STAGING, precision=m.precision, signer=vb.signer or "",
            bundle_sha256=self.board.get(op_id).upload_sha256, report=None, staged=0.0, activated=0.0,
            engine_key="", calibration_cache_id="")

        def progress(stage: str, text: str) -> None:
            self.board.update(op_id, state=_OP_STATE[stage], progress=text)

        staged = await stage(vb, work / str(m.version), self.factory, progress)
        for key, value in staged.seconds.items():
            seconds[key] = value
            metrics.ROLLOUT_STAGE_DURATION.labels(key).observe(value)
        p, report = staged.prepared, staged.report
        p.engine.close()  # activation loads it again from the engine cache
        metrics.set_validation_scores(m.model, str(m.version), _finite(report.scores))
        self.board.update(op_id, stage_seconds=dict(seconds), report=report.to_dict())
        if not report.passed:
            self.store.set_rollout_state(m.model, m.version, FAILED, report.summary(), report=report.to_dict(),
                                         calibration_cache_id=p.calibration_cache_id)
            self._collect_engines({p.key})
            raise BundleError(report.summary())
        final = self.root / m.model / str(m.version)
        await asyncio.to_thread(_install, staged.model_dir, final)
        crashpoints.reached("install")
        version = self.store.set_rollout_state(
            m.model, m.version, STAGED, report.summary(), report=report.to_dict(), engine_key=p.key,
            calibration_cache_id=p.calibration_cache_id, staged=time.time())
        log.info("model %s version %d staged: %s (engine %s)", m.model, m.version, report.summary(), p.key[:16])
        return version

    def _check_new(self, model: str, version: int) -> None:
        record = self.store.rollout_version(model, version)
        if record is not None and record.state != FAILED:
            raise AlreadyExists(f"model {model} version {version} is already on this device ({record.state}); "
                                "a new bundle needs a new version number")
        # A FAILED version never has files of its own: whatever is there belongs to someone else.
        if os.path.lexists(self.root / model / str(version)):
            raise AlreadyExists(f"model {model} version {version} already exists in the repository "
                                f"({model}/{version}); a new bundle needs a new version number")
        if (self.root / model).exists() and not (self.root / model).is_dir():
            raise FailedPrecondition(f"{model} in the model repository is not a directory")

    def _fail(self, op_id: str, error: str, seconds: dict[str, float]) -> None:
        error = layout.scrub(self.root, error)  # operators read it through the admin API
        op = self.board.update(op_id, state=OP_FAILED, error=error, progress="", stage_seconds=dict(seconds))
        current = self.store.rollout_version(op.model, op.version) if op.model else None
        if current is not None and current.state == STAGING:  # refused before or during the build
            self.store.set_rollout_state(op.model, op.version, FAILED, error)
        log.error("operation %s failed: %s", op_id, error)

    # -- activation -------------------------------------------------------------------------------

    async def activate(self, model: str, version: int) -> float:
        """Activate ``version``, then apply retention; the seconds the activation took.

        Each activation and rollback is an operation of its own (kind ``activate`` /
        ``rollback``), so that ``WatchOperations`` shows it and the board counts it.
        """
        self._writable()
        op = self.board.create("activate", model=model, version=version)
        self.board.update(op.id, state=OP_ACTIVATING, progress="loading beside the active version")
        start = time.monotonic()
        try:
            await self.manager.activate(model, version, loaded=lambda: crashpoints.reached("activate"))
        except TegradError as exc:
            self.board.update(op.id, state=OP_FAILED, error=str(exc), progress="")
            raise
        took = _observe("activate", start)
        self.board.update(op.id, state=SUCCEEDED, progress="", stage_seconds={"activate": took})
        await self.retain(model)
        return took

    async def rollback(self, model: str) -> None:
        self._writable()
        op = self.board.create("rollback", model=model, version=self.store.rollout_model(model)[1])
        self.board.update(op.id, state=OP_ACTIVATING, progress="activating the previous version")
        start = time.monotonic()
        try:
            await self.manager.rollback(model, loaded=lambda: crashpoints.reached("activate"))
        except TegradError as exc:
            self.board.update(op.id, state=OP_FAILED, error=str(exc), progress="")
            raise
        self.board.update(op.id, state=SUCCEEDED, progress="", version=self.store.rollout_model(model)[0],
                          stage_seconds={"activate": time.monotonic() - start})

    def check_bundle(self, model: str, version: int, total_size: int, sha: str) -> tuple[int, int]:
        """Before an upload: would this device take the bundle? ``(bytes already held, size limit)``."""
        self._writable()
        if total_size > self.options.max_bundle_bytes:
            raise ResourceExhausted(f"bundle of {total_size} bytes is over this device's limit of "
                                    f"{self.options.max_bundle_bytes} bytes (--max-bundle-mb)")
        if model and version:
            self._check_new(model, version)
        try:
            received = self.uploads.state(sha).received if sha else 0
        except NotFound:
            received = 0
        return received, self.options.max_bundle_bytes

    # -- deletion and retention ---------------------------------------------------------------------

    async def delete(self, model: str, version: int, why: str = "deleted") -> None:
        self._writable()
        record = self.store.rollout_version(model, version)
        mdir = self.root / model
        if record is None and not (mdir / str(version)).is_dir():
            raise NotFound(f"model {model} has no version {version} on this device")
        active, _ = self.store.rollout_model(model)
        serving = version in self.manager.versions(model)
        if version == active or serving or (record is not None and record.state in (STAGING, ACTIVATING, ACTIVE)):
            state = record.state if record else "serving"
            raise FailedPrecondition(f"model {model} version {version} is {state}; activate another version first")
        await asyncio.to_thread(shutil.rmtree, mdir / str(version), True)
        await asyncio.to_thread(fsync_dir, mdir)
        self.store.delete_rollout_version(model, version)
        metrics.forget_validation_scores(model, str(version))
        log.info("model %s version %d %s", model, version, why)
        if record is not None and record.engine_key:
            self._collect_engines({record.engine_key})

    async def retain(self, model: str) -> None:
        """Keep the ``keep_versions`` most recently active versions (and those staged since); delete the rest."""
        keep = self.options.keep_versions
        kept = [v for v in self.store.rollout_versions(model) if v.state in (ACTIVE, INACTIVE)]
        kept.sort(key=lambda v: (v.state == ACTIVE, v.activated), reverse=True)
        for v in kept[keep:]:
            try:
                await self.delete(model, v.version, f"removed: only the last {keep} active versions are kept")
            except TegradError as exc:
                log.warning("model %s version %d: retention could not remove it: %s", model, v.version, exc)

    def _collect_engines(self, candidates: set[str]) -> None:
        """Delete cached engines that no recorded version and no loaded version uses any more."""
        used = {v.engine_key for v in self.store.rollout_versions() if v.state != FAILED}
        used |= {lv.prepared.key for lv in self.manager.loaded()}
        for key in candidates - used:
            self.factory.cache.remove(key)

    # -- views ------------------------------------------------------------------------------------

    def models(self, name: str = "") -> list[tuple[str, int, int, list[tuple[int, RolloutVersion | None]]]]:
        """(model, active, previous, [(version, rollout record or None)]) for each model."""
        names = set(self.store.rollout_models())
        try:
            names |= set(layout.model_names(self.root))
        except NotFound:
            pass
        if name:
            if name not in names:
                raise NotFound(f"model {name!r} is not on this device")
            names = {name}
        out = []
        for model in sorted(names):
            records = {v.version: v for v in self.store.rollout_versions(model)}
            mdir = self.root / model
            on_disk = set(layout.versions_on_disk(mdir)) if mdir.is_dir() else set()
            active, previous = self.store.rollout_model(model)
            versions = sorted(set(records) | on_disk | set(self.manager.versions(model)))
            out.append((model, active, previous, [(v, records.get(v)) for v in versions]))
        return out


def _install(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dest)  # same file system (both under the repository): atomic
    fsync_dir(dest.parent)


def _observe(stage: str, start: float) -> float:
    took = time.monotonic() - start
    metrics.ROLLOUT_STAGE_DURATION.labels(stage).observe(took)
    return took


def _finite(scores: dict) -> dict[str, float]:
    return {k: float(v) for k, v in scores.items() if v is not None}
