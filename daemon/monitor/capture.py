"""Field capture: a bounded ring of monitored model inputs on disk, for recalibration.

Layout of ``capture_dir`` (documented in the README):

* ``capture.json`` — ``{"format": "tegrad-capture", "format_version": 1, "model", "version",
  "inputs": {name: {"datatype", "shape"}}}``, written once.
* ``<seq:012d>.npz`` — one sample each, keyed by model input name, batch dimension 1, the
  preprocessed tensors the engine saw. The oldest files go first once the directory holds
  more than ``capture_max_mb``.

``tegrad calibrate --data <capture_dir>`` reads the directory as calibration data.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from pathlib import Path

import numpy as np

log = logging.getLogger("tegrad.monitor")

FORMAT = "tegrad-capture"
FORMAT_VERSION = 1


class Capture:
    def __init__(self, directory: Path, max_bytes: int, model: str, version: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._model, self._version = model, version
        self.dir.mkdir(parents=True, exist_ok=True)
        files = sorted(self.dir.glob("[0-9]*.npz"))
        self._files: deque[tuple[Path, int]] = deque((p, p.stat().st_size) for p in files)
        self._bytes = sum(s for _, s in self._files)
        self._seq = int(files[-1].stem) + 1 if files else 0
        self._described = (self.dir / "capture.json").exists()

    def add(self, feeds: dict[str, np.ndarray]) -> None:
        if not self._described:
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self._model,
                    "version": self._version,
                    "inputs": {k: {"datatype": v.dtype.name, "shape": list(v.shape[1:])} for k, v in feeds.items()}}
            (self.dir / "capture.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            self._described = True
        buf = io.BytesIO()
        np.savez_compressed(buf, **feeds)
        data = buf.getvalue()
        path = self.dir / f"{self._seq:012d}.npz"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._seq += 1
        self._files.append((path, len(data)))
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._files) > 1:
            old, size = self._files.popleft()
            old.unlink(missing_ok=True)
            self._bytes -= size
