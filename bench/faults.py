"""Disk, database, config and permission faults: what a reload (or a restart) answers, and how fast.

Each fault is applied under a daemon (its own process) that serves ``scale`` version 1; then
a RepositoryModelLoad asks for version 2 (or the daemon is restarted, for a damaged state
database). Printed per fault: the status, the time the answer took, whether version 1 still
answers right, what RepositoryIndex says of version 2, and whether the message carries an
absolute server path. ``--tree DIR`` runs another source tree's daemon (e.g. a ``git archive``
of main) with the same faults, for a before/after table in one run:

    python bench/faults.py
    git archive main | tar -x -C /tmp/before && python bench/faults.py --tree /tmp/before

Disk-full faults mount a tmpfs (root only); permission faults run the daemon without
CAP_DAC_OVERRIDE (setpriv). Faults that cannot be set up here are listed as skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from bench.tables import say, table  # noqa: E402
from tests.interop.conftest import DIGITS, start_server  # noqa: E402
from tests.interop.test_faults import X4, _damage, _fill, _version  # noqa: E402


def _factor(c) -> str:
    try:
        inp = grpcclient.InferInput("x", list(X4.shape), "FP32")
        inp.set_data_from_numpy(X4)
        return f"x{float((c.infer('scale', [inp]).as_numpy('y') / X4)[0, 0]):g}"
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")


def _v2(c) -> str:
    try:
        rows = {m.version: m.state for m in c.get_model_repository_index().models if m.name == "scale"}
        return rows.get("2", "-")
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")


class Bench:
    def __init__(self, tree: Path | None, work: Path) -> None:
        self.tree, self.work, self.n = tree, work, 0
        self.mounts: list[Path] = []

    def command(self, prefix: list[str] = ()) -> list[str]:
        # -P: the tree on PYTHONPATH wins over the working directory
        return [*prefix, sys.executable, "-P", "-m", "daemon", "serve"] if self.tree else \
            [*prefix, sys.executable, "-m", "daemon", "serve"]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.tree)} if self.tree else {}

    def fresh(self) -> tuple[Path, Path]:
        self.n += 1
        case = self.work / f"case{self.n}"
        repo = case / "repo"
        _version(repo, 1, 2.0)
        (repo / "scale" / "config.toml").write_text("max_batch = 8\n")
        return repo, case

    def tmpfs(self, path: Path, size: str) -> bool:
        path.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True).returncode == 0
        if ok:
            self.mounts.append(path)
        return ok

    def reload(self, name: str, fault: Callable[[Path, Path], Callable[[], None] | None], *,
               state_on_tmpfs: str = "", cache_on_tmpfs: str = "", unprivileged: bool = False) -> list[str]:
        repo, case = self.fresh()
        state, args = case / "state", ["--model-control", "explicit", "--load-model", "scale"]
        if state_on_tmpfs and not self.tmpfs(state, state_on_tmpfs):
            return [name, "skipped: no tmpfs", "", "", "", ""]
        if cache_on_tmpfs:
            if not self.tmpfs(case / "engines", cache_on_tmpfs):
                return [name, "skipped: no tmpfs", "", "", "", ""]
            args += ["--engine-cache-dir", str(case / "engines")]
        prefix = []
        if unprivileged and os.geteuid() == 0:
            if not shutil.which("setpriv"):
                return [name, "skipped: no setpriv", "", "", "", ""]
            caps = "-dac_override,-dac_read_search"
            prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
        server = start_server(self.command(prefix), repository=repo, state_dir=state, args=tuple(args), env=self.env())
        try:
            with grpcclient.InferenceServerClient(server.url) as c:
                _version(repo, 2, 3.0)
                undo = fault(repo, case)
                start = time.perf_counter()
                try:
                    c.load_model("scale")
                    status, message = "OK", ""
                except InferenceServerException as exc:
                    status, message = str(exc.status()).removeprefix("StatusCode."), exc.message() or ""
                took = (time.perf_counter() - start) * 1000
                row = [name, status, f"{took:.0f}", _factor(c), _v2(c), "yes" if str(case) in message else "no"]
                if undo:
                    undo()
                say(f"  {name}: {status} {message[:160]}")
                return row
        finally:
            server.stop()

    def restart(self, how: str) -> list[str]:
        repo, case = self.fresh()
        state = case / "state"
        args = ("--model-control", "explicit", "--load-model", "scale")
        first = start_server(self.command(), repository=repo, state_dir=state, args=args, env=self.env())
        first.stop()
        _damage(state / "state.sqlite3", how)
        start = time.perf_counter()
        try:
            second = start_server(self.command(), repository=repo, state_dir=state, args=args, env=self.env())
        except AssertionError:
            return [f"state.sqlite3 {how}", "exit (no daemon)", f"{(time.perf_counter() - start) * 1000:.0f}",
                    "-", "-", "-"]
        took = (time.perf_counter() - start) * 1000
        try:
            with grpcclient.InferenceServerClient(second.url) as c:
                return [f"state.sqlite3 {how}", "serves after restart", f"{took:.0f}", _factor(c), "-", "-"]
        finally:
            second.stop()

    def close(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)


def _chmod0(target: str):
    def fault(repo: Path, case: Path):
        path = repo / target
        mode = path.stat().st_mode
        path.chmod(0)
        return lambda: path.chmod(mode)
    return fault


def _config(content: bytes, where: str = "scale/config.toml"):
    def fault(repo: Path, case: Path):
        (repo / where).write_bytes(content)
    return fault


def _small_cache(free: int, repo: Path, case: Path) -> None:
    shutil.copy(DIGITS / "1" / "model.onnx", repo / "scale" / "2" / "model.onnx")
    _fill(case / "engines", free)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", type=Path, help="source tree whose daemon to run (default: this one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tegrad-faults-"))
    bench = Bench(args.tree.resolve() if args.tree else None, work)
    rows = []
    try:
        rows.append(bench.reload("state dir full (tmpfs)", lambda repo, case: _fill(case / "state") and None,
                                 state_on_tmpfs="16m"))
        for free in (32, 200):  # the lowered ONNX does not fit / it does, the engine after it not
            rows.append(bench.reload(f"engine cache {free} KiB free, 97 KB model", partial(_small_cache, free << 10),
                                     cache_on_tmpfs="8m"))
        for how in ("random", "truncated", "header-zeroed"):
            rows.append(bench.restart(how))
        rows.append(bench.reload("config.toml invalid UTF-8", _config(b'max_batch = 8\nname = "\xc3\x28"\n')))
        rows.append(bench.reload("config.toml [ x 100000", _config(b"max_batch = " + b"[" * 100_000)))
        rows.append(bench.reload("2/config.toml {a= x 50000", _config(b"max_batch = " + b"{a = " * 50_000,
                                                                       "scale/2/config.toml")))
        for target in ("scale/2", "scale/2/model.onnx", "."):
            rows.append(bench.reload(f"chmod 000 {target}", _chmod0(target), unprivileged=True))
        rows.append(bench.reload("unknown model (NOT_FOUND path)", lambda repo, case: shutil.rmtree(repo / "scale")))
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    say()
    say(f"daemon from: {args.tree or ROOT}")
    say(table(["fault", "status", "ms", "v1 answers", "v2 in index", "abs path in message"], rows, "llrlll"))


if __name__ == "__main__":
    main()
