"""The README's walkthroughs, run as written.

Marking: a fenced block whose info string is ``sh runnable`` is runnable. Blocks are grouped by
the ``## `` section they sit in (one walkthrough per section) and run in README order with bash
(``set -e``), each block in its own process group, in one temporary directory per test, with
``.venv/bin`` first on PATH, ``daemon`` linked to the checkout's, ``ZOO`` pointing at
``../shared/zoo`` (or ``$ZOO``) and free ports in ``GRPC_PORT``/``METRICS_PORT``. A block may start
``tegrad serve ... &``: the test kills every block's process group at the end. Walkthroughs that
use ``$ZOO`` skip with the reason when the zoo is absent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ZOO = Path(os.environ.get("ZOO", ROOT.parent / "shared" / "zoo")).resolve()
_BLOCK = re.compile(r"^```sh runnable\n(.*?)^```$", re.S | re.M)
_BLOCK_TIMEOUT_S = 240


def walkthroughs() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    found: dict[str, list[str]] = {}
    for section in re.split(r"(?m)^(?=## )", text):
        blocks = _BLOCK.findall(section)
        if blocks:
            found[section.split("\n", 1)[0][3:].strip()] = blocks
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_walkthroughs(tmp_path: Path, *titles: str) -> str:
    """Run the runnable blocks of these walkthroughs in order in one directory; their output."""
    found = walkthroughs()
    blocks = [(title, b) for title in titles for b in found[title]]
    if any("$ZOO" in b for _, b in blocks) and not (ZOO / "models").is_dir():
        pytest.skip(f"{titles} need the model zoo, absent at {ZOO} (set ZOO)")
    (tmp_path / "daemon").symlink_to(ROOT / "daemon")
    env = {**os.environ, "ZOO": str(ZOO), "GRPC_PORT": str(_free_port()), "METRICS_PORT": str(_free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    groups: list[int] = []
    out: list[str] = []
    try:
        for i, (title, block) in enumerate(blocks):
            if i and title != blocks[i - 1][0]:
                _kill(groups)  # a walkthrough's server goes before the next one starts its own
            proc = subprocess.Popen(["bash", "-e", "-c", block], cwd=tmp_path, env=env, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            groups.append(proc.pid)
            stdout, _ = proc.communicate(timeout=_BLOCK_TIMEOUT_S)
            out.append(stdout)
            log = tmp_path / "serve.log"
            assert proc.returncode == 0, (
                f"{title}: block {i + 1} exited {proc.returncode}:\n{block}\n--- output:\n{stdout}"
                f"\n--- serve.log:\n{log.read_text() if log.exists() else '(none)'}")
    finally:
        _kill(groups)
    return "".join(out)


def _kill(groups: list[int]) -> None:
    """Blocks leave `tegrad serve ... &` running in their process groups."""
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    groups.clear()


def test_every_walkthrough_is_checked():
    assert set(walkthroughs()) == {"Quick start", "Your own classifier: EfficientNet-Lite0",
                                   "Your own detector: YOLOX-Nano", "INT8 and the plan",
                                   "Bundles and rollout"}


def test_quick_start_classifies_the_shipped_samples_as_their_digits(tmp_path):
    out = run_walkthroughs(tmp_path, "Quick start")
    # `tegrad infer -k K` prints Triton's classification strings, score:index:label, best first.
    best = [m.group(1) for m in re.finditer(r"^logits: [-\d.]+:\d+:(\S+)", out, re.M)]
    assert best == ["3", "7"], out


def test_the_classifier_walkthrough_names_the_tench(tmp_path):
    out = run_walkthroughs(tmp_path, "Your own classifier: EfficientNet-Lite0")
    assert re.search(r"^labels: tench, Tinca tinca  ", out, re.M), out


def test_the_detector_walkthrough_prints_a_person_row(tmp_path):
    out = run_walkthroughs(tmp_path, "Your own detector: YOLOX-Nano")
    rows = [line.split() for line in out.splitlines()]
    assert ["LABEL", "SCORE", "X1", "Y1", "X2", "Y2"] in rows, out
    assert any(r and r[0] == "person" and len(r) == 6 for r in rows), out


def test_the_int8_walkthrough_calibrates_quantizes_and_evaluates(tmp_path):
    # It continues the classifier's: models/effnet is the repository that one made.
    out = run_walkthroughs(tmp_path, "Your own classifier: EfficientNet-Lite0", "INT8 and the plan")
    figures = json.loads(out[out.rindex("{\n"):out.rindex("}") + 1])
    assert figures["samples"] == 32 and figures["top1_agreement"] >= 0.75, figures
    assert (tmp_path / "models" / "effnet" / "calib.json").is_file()


def test_the_bundle_walkthrough_pushes_int8_activates_and_rolls_back(tmp_path):
    out = run_walkthroughs(tmp_path, "Your own classifier: EfficientNet-Lite0", "INT8 and the plan",
                           "Bundles and rollout")
    assert re.search(r"^active: effnet v2 in ", out, re.M), out
    assert re.search(r"^  v2 +ACTIVE +READY +int8 ", out, re.M), out
    assert "effnet: rolled back to version 1" in out, out
    for kind in ("stage", "activate", "rollback"):
        assert re.search(rf"^{kind}-\w+ effnet v\d SUCCEEDED", out, re.M), (kind, out)
