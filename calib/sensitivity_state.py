"""The resumable record of a sensitivity run: one JSON line per measured row, appended as it comes.

The first line is a header with the run's key (hashes of the model, the amax values and the data
slice, and every option that changes a number). Re-running with the same key reuses the rows
already there and measures only the rest; a different key starts the file afresh. A line cut
short by a kill is ignored (its row is measured again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

FORMAT = 1


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


class StateFile:
    """Rows keyed by (kind, chunk, layer); :meth:`add` appends and syncs one line."""

    def __init__(self, path: str | os.PathLike, key: Mapping):
        self.path = Path(path)
        self.key = json.loads(json.dumps(dict(key), sort_keys=True, default=str))
        self.rows: dict[tuple[str, int, str], dict] = {}
        self.reason = ""  # why earlier rows were not reused, for the one line the CLI prints
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            self._start()
            return
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except ValueError:
            header = {}
        if header.get("format") != FORMAT or header.get("key") != self.key:
            old = header.get("key") or {}
            diff = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
            self.reason = f"{self.path}: earlier rows are for other options ({', '.join(diff) or 'unreadable header'}); starting afresh"
            self._start()
            return
        for line in lines[1:]:
            try:
                row = json.loads(line)
                self.rows[(row["kind"], int(row["chunk"]), row.get("layer", ""))] = row
            except (ValueError, KeyError, TypeError):
                continue
        self._fix_tail()

    def _fix_tail(self) -> None:
        """A kill mid-write leaves a partial last line; end it so the next row starts on its own line."""
        with open(self.path, "rb+") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "key": self.key}, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def get(self, kind: str, chunk: int, layer: str = "") -> dict | None:
        return self.rows.get((kind, chunk, layer))

    def add(self, kind: str, chunk: int, layer: str = "", **fields) -> None:
        row = {"kind": kind, "chunk": chunk, "layer": layer, **fields}
        self.rows[(kind, chunk, layer)] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")  # one write: a whole line or a cut one
            f.flush()
            os.fsync(f.fileno())

    def count(self, kind: str) -> int:
        return sum(1 for k in self.rows if k[0] == kind)
