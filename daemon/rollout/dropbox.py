"""The drop-box: fleets that deliver files (Mender, Greengrass, rsync, a USB stick) put bundles in a
directory, and tegrad stages them exactly as uploads.

A file is taken when its name ends in ``.tegrad`` (other names, dot-files and
``*.partial`` are left alone: writers should write under another name and
rename) and its size and modification time did not change between two polls.
It is claimed by renaming it into the upload directory under its sha256, then
staged; the operation's outcome is written to ``results/<name>.result.json``
in the drop-box.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

from calib.cache import atomic_write_text
from daemon.errors import TegradError
from daemon.rollout.controller import Rollouts

log = logging.getLogger("tegrad.rollout")
SUFFIX = ".tegrad"


class DropBox:
    def __init__(self, directory: Path, rollouts: Rollouts, interval: float = 1.0) -> None:
        self.dir = directory
        self.rollouts = rollouts
        self.interval = interval
        self._seen: dict[str, tuple[int, int]] = {}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results").mkdir(exist_ok=True)

    async def run(self) -> None:
        log.info("drop-box: watching %s for *%s bundles", self.dir, SUFFIX)
        while True:
            try:
                await self.poll()
            except Exception:  # the watcher must outlive one bad file
                log.exception("drop-box: poll of %s failed", self.dir)
            await asyncio.sleep(self.interval)

    async def poll(self) -> None:
        present = {}
        for path in sorted(self.dir.iterdir()):
            if not path.name.endswith(SUFFIX) or path.name.startswith(".") or not path.is_file():
                continue
            st = path.stat()
            present[path.name] = (st.st_size, st.st_mtime_ns)
            if self._seen.get(path.name) == present[path.name]:
                await self._take(path)
                present.pop(path.name)
        self._seen = present

    async def _take(self, path: Path) -> None:
        claimed = self.rollouts.uploads.dir / f".dropbox-{path.name}"
        try:
            # Same file system: a rename; otherwise a copy (then the original goes).
            await asyncio.to_thread(_move, path, claimed)
            sha = await asyncio.to_thread(self.rollouts.uploads.adopt, claimed)
            op = self.rollouts.stage(sha, source=f"drop-box {path.name}")
        except (TegradError, OSError) as exc:
            log.error("drop-box: %s refused: %s", path.name, exc)
            self._result(path.name, {"file": path.name, "state": "FAILED", "error": str(exc)})
            return
        log.info("drop-box: %s taken as operation %s", path.name, op.id)
        asyncio.ensure_future(self._report(path.name, op.id))

    async def _report(self, name: str, op_id: str) -> None:
        async for op in self.rollouts.board.watch(op_id):
            if op.done:
                self._result(name, {"file": name, "operation": op.id, "state": op.state, "model": op.model,
                                    "version": op.version, "error": op.error, "validation": op.report})

    def _result(self, name: str, doc: dict) -> None:
        atomic_write_text(self.dir / "results" / f"{name}.result.json", json.dumps(doc, indent=2) + "\n")


def _move(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.unlink(src)
