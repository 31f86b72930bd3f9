"""``tegrad inspect MODEL``: what the engines built for a model run in, layer by layer, read from
the engine cache on disk (the daemon need not run). A TensorRT engine carries its inspector's
per-layer precision and device (recorded at build); an ONNX Runtime engine, its ONNX count.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.engines.cache import META
from daemon.engines.tensorrt.layers import table


def _entries(cache_dir: Path, model: str, version: int | None) -> list[dict]:
    found = []
    for meta_path in sorted((cache_dir / "entries").glob(f"*/{META}")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an entry being written or damaged: the cache deals with it on lookup
        if meta.get("model") == model and version in (None, meta.get("version")):
            found.append(meta)
    return sorted(found, key=lambda m: (m.get("version", 0), m.get("last_used", 0)), reverse=True)


def run(args) -> int:
    cache_dir = args.engine_cache_dir or args.state_dir / "engines"
    entries = _entries(cache_dir, args.model, args.model_version)
    if not entries:
        which = f"{args.model!r}" + (f" version {args.model_version}" if args.model_version else "")
        print(f"no engine for model {which} in the engine cache {cache_dir} (built engines are kept there; "
              "pass --engine-cache-dir or --state-dir as given to tegrad serve)")
        return 1
    for meta in entries if args.all else entries[:1]:
        counts = meta.get("layers", {})
        print(f"model {meta.get('model')} version {meta.get('version')}: engine {str(meta.get('key', ''))[:16]}, "
              f"{meta.get('backend')} {meta.get('precision')}; layers "
              + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"))
        info = meta.get("build_info") or {}
        placement = info.get("dla_placement")
        if placement:
            print(f"DLA before the build: {placement.get('dla', 0)} layers on DLA, {placement.get('gpu', 0)} on the "
                  f"GPU ({placement.get('fp32', 0)} in FP32)")
        rows = info.get("engine_layers")
        if rows:
            print(table(rows))
        elif meta.get("backend") == "tensorrt":
            print("no per-layer table: the engine inspector gave none for this build")
        else:
            print("no per-layer table: ONNX Runtime engines are counted in the lowered ONNX (weighted layers)")
    return 0
