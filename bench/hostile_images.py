"""Hostile images against a running daemon: status, client time and server memory per input.

Starts ``tegrad serve`` (from this tree, or from the tree named by ``--tree``, e.g. an export of
an older commit, to measure before and after side by side) with the embedded digits model and a
center-crop colour classifier (EfficientNet-Lite0's preprocessing), sends each input of issue
10's rows 1, 2, 3 and 15 through tritonclient, and prints one row per input and model: status,
the server's time on it (ModelStatistics), client wall time, the server's peak extra RSS while the request ran (VmHWM after resetting it
through /proc/<pid>/clear_refs) and the RSS still held once it had answered.

    .venv/bin/python bench/hostile_images.py                   # this tree
    git archive e63db16 | tar -x -C /tmp/before && \\
      .venv/bin/python bench/hostile_images.py --tree /tmp/before --only png20k-digits,strip-colour

Inputs whose decoding takes gigabytes on a tree without the header checks are listed with
``--only`` so as not to run a shared machine out of memory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from bench.tables import say, table  # noqa: E402
from tests.interop.conftest import DIGITS, start_server  # noqa: E402
from tests.interop.test_hostile_images import COLOUR_CONFIG, colour_classifier  # noqa: E402
from tests.processing.hostile import (  # noqa: E402
    bomb_jpeg,
    bomb_png,
    peak_extra_rss,
    status_kb,
    strip_png,
    truncated_jpeg_with_eoi,
)


def inputs() -> dict[str, list[bytes]]:
    png20k = bomb_png(20000, 20000)
    digit = np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((32, 32), np.uint8))
    return {
        "png20k": [png20k],
        "jpeg20k": [bomb_jpeg(20000, 20000)],
        "png30k": [bomb_png(30000, 30000)],
        "8xpng20k": [png20k] * 8,
        "strip": [strip_png(20000, 1)],
        "truncated+EOI": [truncated_jpeg_with_eoi(cv2.cvtColor(digit, cv2.COLOR_GRAY2BGR))],
    }


def _server_ns(client, model: str) -> int:
    """Time the server spent on the model's requests, served and failed (Triton's ModelStatistics):
    from the parsed request to the answer, without moving the bytes."""
    stats = client.get_inference_statistics(model).model_stats[0].inference_stats
    return stats.success.ns + stats.fail.ns


def _command(tree: Path) -> list[str]:
    # Import the daemon from ``tree`` whatever this interpreter has installed.
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from daemon.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "serve"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree whose daemon is measured (default: this one)")
    parser.add_argument("--only", default="", help="comma-separated input-model pairs, e.g. png20k-digits,strip-colour")
    parser.add_argument("--timeout", type=float, default=180.0, help="client deadline per request, seconds")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}

    work = Path(tempfile.mkdtemp(prefix="tegrad-hostile-"))
    repo = work / "repo"
    shutil.copytree(DIGITS, repo / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    colour_classifier(repo / "colour" / "1" / "model.onnx")
    (repo / "colour" / "config.toml").write_text(COLOUR_CONFIG)
    say(f"daemon from {args.tree}")
    server = start_server(_command(args.tree.resolve()), repository=repo, state_dir=work / "state")
    rows = []
    try:
        with grpcclient.InferenceServerClient(server.url) as client:
            warm = grpcclient.InferInput("image", [1], "BYTES")  # first-request costs are not the input's
            warm.set_data_from_numpy(np.array([cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()],
                                              dtype=object))
            for model in ("digits", "colour"):
                client.infer(model, [warm], client_timeout=args.timeout)
            for name, files in inputs().items():
                for model in ("digits", "colour"):
                    if only and f"{name}-{model}" not in only:
                        continue
                    inp = grpcclient.InferInput("image", [len(files)], "BYTES")
                    inp.set_data_from_numpy(np.array(files, dtype=object))

                    def send(inp=inp, model=model):
                        start = time.perf_counter()
                        try:
                            client.infer(model, [inp], client_timeout=args.timeout)
                            status = "OK"
                        except InferenceServerException as exc:
                            status = str(exc.status()).removeprefix("StatusCode.")
                        return status, time.perf_counter() - start

                    rss0 = status_kb(server.proc.pid, "VmRSS")
                    ns0 = _server_ns(client, model)
                    (status, elapsed), peak = peak_extra_rss(server.proc.pid, send)
                    server_ms = (_server_ns(client, model) - ns0) / 1e6
                    held = max(0, status_kb(server.proc.pid, "VmRSS") - rss0) << 10
                    size = sum(len(f) for f in files)
                    rows.append([name, model, f"{size / 1024:.0f} KB" if size > 10240 else f"{size} B", status, f"{server_ms:.1f}", f"{elapsed * 1000:.1f}",
                                 f"{peak / 2**20:.1f}", f"{held / 2**20:.1f}"])
                    say(f"  {rows[-1]}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    say()
    say(table(["input", "model", "size", "status", "server ms", "client ms", "peak extra RSS MiB", "held after MiB"], rows,
              "lllrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
