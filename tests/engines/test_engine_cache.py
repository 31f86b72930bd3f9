"""Engine cache: keys change with exactly what changes an engine; entries are checked, atomic and evicted LRU."""

from __future__ import annotations

import json
import os

import pytest

from daemon.engines.cache import EngineCache, engine_key, recipe_key

SHA_A, SHA_B = "a" * 64, "b" * 64
FP = {"backend": "tensorrt", "version": "10.3.0", "device": "Orin", "compute_capability": "8.7", "dla_core": "-1",
      "options": "workspace_mb=1024"}
BASE = dict(source_sha256=SHA_A, calibration_sha256="c" * 64, precision="mixed", exclude=("conv1",),
            exclude_precision="fp16", target="tensorrt")


def test_recipe_key_is_stable_and_sees_every_input():
    key = recipe_key(**BASE)
    assert key == recipe_key(**BASE)
    assert key == recipe_key(**{**BASE, "exclude": ["conv1"]}), "a list and a tuple of the same layers"
    changed = {
        "model bytes": {"source_sha256": SHA_B},
        "calibration cache": {"calibration_sha256": "d" * 64},
        "precision": {"precision": "int8"},
        "exclusions": {"exclude": ("conv1", "fc")},
        "exclude precision": {"exclude_precision": "fp32"},
        "target": {"target": "cpu"},
    }
    keys = {what: recipe_key(**{**BASE, **change}) for what, change in changed.items()}
    for what, other in keys.items():
        assert other != key, f"changing the {what} must change the key"
    assert len(set(keys.values())) == len(keys)


def test_engine_key_changes_with_the_lowered_graph_or_the_fingerprint_only():
    key = engine_key(SHA_A, FP)
    assert key == engine_key(SHA_A, dict(reversed(list(FP.items())))), "dict order is not part of the key"
    assert engine_key(SHA_B, FP) != key
    for field, value in (("version", "11.4.0"), ("device", "Thor"), ("compute_capability", "11.0"),
                         ("dla_core", "0"), ("options", "workspace_mb=2048")):
        assert engine_key(SHA_A, {**FP, field: value}) != key, field


def _store(cache: EngineCache, tmp_path, key: str, payload: bytes):
    src = tmp_path / f"{key}.onnx"
    src.write_bytes(payload)
    return cache.store(key, src, {"layers": {"int8": 3}})


def test_store_then_lookup_round_trips_and_records_use(tmp_path):
    cache = EngineCache(tmp_path / "c", 1 << 30)
    entry = _store(cache, tmp_path, "k1", b"engine bytes")
    assert entry.artifact.read_bytes() == b"engine bytes"
    assert not (tmp_path / "k1.onnx").exists(), "stored by moving the build output"
    found = cache.lookup("k1")
    assert found is not None and found.meta["layers"] == {"int8": 3}
    assert found.meta["last_used"] >= entry.meta["last_used"]
    assert cache.lookup("missing") is None
    cache.remember_recipe("r1", SHA_A)
    assert cache.lowered_sha("r1") == SHA_A and cache.lowered_sha("r2") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "bad-meta"])
def test_damaged_entry_is_detected_and_deleted(tmp_path, damage):
    cache = EngineCache(tmp_path / "c", 1 << 30)
    entry = _store(cache, tmp_path, "k1", bytes(range(256)) * 64)
    data = entry.artifact.read_bytes()
    if damage == "truncate":
        entry.artifact.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        entry.artifact.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":
        entry.artifact.unlink()
    else:
        (entry.artifact.parent / "meta.json").write_text("{not json")
    assert cache.lookup("k1") is None
    assert not entry.artifact.parent.exists(), "the damaged entry is removed so that it gets rebuilt"


def test_eviction_removes_least_recently_used_and_spares_kept_keys(tmp_path):
    cache = EngineCache(tmp_path / "c", 1 << 30)
    for i, key in enumerate(("old", "kept", "mid", "new")):
        entry = _store(cache, tmp_path, key, b"x" * 1000)
        meta = json.loads((entry.artifact.parent / "meta.json").read_text())
        meta["last_used"] = 1000.0 + i  # deterministic order: old < kept < mid < new
        (entry.artifact.parent / "meta.json").write_text(json.dumps(meta))
    cache.max_bytes = cache.size() - 1500  # room for two entries less
    removed = cache.evict(keep={"kept"})
    assert removed == ["old", "mid"]
    assert {p.name for p in cache.entries.iterdir()} == {"kept", "new"}
    assert cache.size() <= cache.max_bytes


def test_interrupted_store_and_build_leftovers_are_cleared_at_start(tmp_path):
    cache = EngineCache(tmp_path / "c", 1 << 30)
    (cache.entries / ".incoming-k9-1-1").mkdir()
    scratch = cache.scratch()
    (scratch / "engine.onnx").write_bytes(b"half")
    _store(cache, tmp_path, "k1", b"whole")
    again = EngineCache(tmp_path / "c", 1 << 30)
    assert sorted(os.listdir(again.entries)) == ["k1"]
    assert os.listdir(again.tmp) == []
    assert again.lookup("k1") is not None


def test_timing_cache_is_per_device_and_version_not_per_build_options(tmp_path):
    cache = EngineCache(tmp_path / "c", 1 << 30)
    assert cache.timing_cache(FP) == cache.timing_cache({**FP, "options": "workspace_mb=64", "max_batch": "8"})
    assert cache.timing_cache(FP) != cache.timing_cache({**FP, "version": "11.4.0"})
