"""Time from push to active: upload -> verify -> extract -> build -> validate -> activate, cold and warm.

Two signed int8 bundles are pushed through the admin API (``tegrad.v1.Admin`` on a Unix socket) of a
``tegrad serve`` running as a separate process, as ``tegrad push --activate`` would:

- digits (the embedded default model) at int8 with its shipped calibration cache, version 2, beside
  the fp32 version 1 the repository starts with;
- EfficientNet-Lite0 (benchmark zoo) at int8 as a new model, version 1, calibrated on the zoo's
  ``images/calib`` and validated on ``images/imagenet_eval`` golden samples. Its validation thresholds
  are relaxed (--min-top1-agreement, --min-cosine): with 16 samples the default 0.99 top-1 agreement
  allows no disagreement at all, and entropy-calibrated INT8 reaches a logit cosine of about 0.976.

Each is pushed cold (empty engine cache: the int8 lowering and the engine build run), then pushed
again as the next version with the same model and calibration cache (warm: engine cache hit, no
build), then rolled back to the cold version. After each activation one inference through
tritonclient checks that the new version answers. Every repeat starts a fresh daemon with a fresh
repository and state directory, so each cold push really is cold. Bundle creation (golden outputs,
calibration, signing) happens once, before any daemon starts, and is reported on its own.

    python bench/rollout.py                 # 3 repeats, medians
    python bench/rollout.py --quick         # 1 repeat
    python bench/rollout.py --auto-activate # Stage(auto_activate=true) instead of a separate Activate RPC

push -> active runs from the start of the upload (client-side sha256 included, as in ``tegrad push``)
to the Activate RPC returning (or, with --auto-activate, to the operation reporting SUCCEEDED).
The verify/extract/build/validate figures are the daemon's own stage_seconds; "stage wall" is the
client's view of the same staging (Stage RPC to the operation's end), so "stage wall" minus their sum
is the install, bookkeeping and notification overhead.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say as _say  # noqa: E402
from bench.tables import table as _table  # noqa: E402
from daemon.rollout.admin_client import AdminClient, state_name  # noqa: E402
from daemon.rollout.make import create, sign_bundle  # noqa: E402

# tritonclient-side helpers (no daemon.protogen KServe modules), as bench/engine_start.py uses
from tests.interop.rollout_support import heldout_digits, make_keys, start_device  # noqa: E402

DIGITS = ROOT / "daemon" / "models" / "digits"
ZOO = ROOT.parent / "shared" / "zoo"
EFFNET = "efficientnet_lite0"
STAGES = ("verify", "extract", "build", "validate")

EFFNET_CONFIG = """\
# EfficientNet-Lite0 (benchmark zoo), ImageNet-1k. Clients send the preprocessed tensor:
# RGB, short side 256 (bilinear), center crop 224, (x - 127) / 128, NCHW.
backend = "onnxruntime"
precision = "int8"
calibration_cache = "calib.json"
max_batch = 8
instances = 1

[[input]]
name = "input"
datatype = "FP32"
dims = [3, 224, 224]
format = "NCHW"

[[output]]
name = "logits"
datatype = "FP32"
dims = [1000]
labels = "labels.txt"
"""


# ---------------------------------------------------------------------------------------------
# keys and bundles (made once, before any daemon runs; not part of push -> active)
# ---------------------------------------------------------------------------------------------
@dataclass
class Bundle:
    label: str
    model: str
    version: int
    path: Path
    create_s: float
    sign_s: float
    mb: float
    note: str = ""


def _signed(label: str, source: Any, out: Path, version: int, key: Path, note: str = "", **kw) -> Bundle:
    t0 = time.perf_counter()
    manifest = create(source, out, version=version, **kw)
    t1 = time.perf_counter()
    sign_bundle(out, key)
    t2 = time.perf_counter()
    return Bundle(label, manifest.model, version, out, t1 - t0, t2 - t1, out.stat().st_size / 1e6, note)


def digits_bundles(work: Path, key: Path, cold: int, warm: int) -> tuple[Bundle, Bundle]:
    """Digits at int8 with the shipped calibration cache, as versions ``cold`` and ``warm`` (same content)."""
    src = work / "digits-int8" / "digits"
    src.mkdir(parents=True)
    shutil.copy(DIGITS / "1" / "model.onnx", src / "model.onnx")
    for name in ("calib.json", "labels.txt"):
        shutil.copy(DIGITS / name, src / name)
    config = (DIGITS / "config.toml").read_text()
    assert 'precision = "fp32"' in config, "the digits config changed; update this bench"
    (src / "config.toml").write_text(config.replace('precision = "fp32"',
                                                    'precision = "int8"\ncalibration_cache = "calib.json"'))
    golden = heldout_digits()[0][:64]
    note = "shipped calib.json"
    a = _signed(f"digits int8 v{cold}", src, work / f"digits-v{cold}.tegrad", cold, key, note,
                golden_inputs=golden, golden_count=64)
    b = _signed(f"digits int8 v{warm}", src, work / f"digits-v{warm}.tegrad", warm, key, note,
                golden_inputs=golden, golden_count=64)
    return a, b


def _eval_images(count: int, skip: int = 0) -> tuple[list[Path], list[int]]:
    folder = ZOO / "images" / "imagenet_eval"
    with open(folder / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["filename"])[skip:skip + count]
    return [folder / r["filename"] for r in rows], [int(r["class_index"]) for r in rows]


def _preprocessed(files: list[Path]) -> np.ndarray:
    from calib.preprocess import PRESETS, load_image, preprocess

    spec = PRESETS["efficientnet-lite0"]
    return np.stack([preprocess(load_image(p), spec)[0] for p in files]).astype(np.float32)


def effnet_bundles(work: Path, key: Path, cold: int, warm: int, calib_images: int, golden: int,
                   validation: dict[str, Any], algorithm: str) -> tuple[Bundle, Bundle]:
    """EfficientNet-Lite0 int8: ``cold`` calibrates on the zoo (inside create), ``warm`` reuses that cache."""
    from calib.datasets import ImageFolder
    from calib.preprocess import PRESETS

    model = ZOO / "models" / "efficientnet-lite0.onnx"
    labels = ZOO / "labels" / "imagenet_synset_words.txt"
    files, _ = _eval_images(golden)
    golden_x = _preprocessed(files)
    calib_data = ImageFolder(ZOO / "images" / "calib", PRESETS["efficientnet-lite0"], limit=calib_images)
    a = _signed(f"{EFFNET} int8 v{cold}", model, work / f"effnet-v{cold}.tegrad", cold, key,
                f"calibrated on {len(calib_data)} zoo images ({algorithm})", name=EFFNET, config_text=EFFNET_CONFIG,
                labels=labels, golden_inputs=golden_x, golden_count=golden, validation=validation,
                calibrate_data=calib_data, calibrate_algorithm=algorithm)
    # The same calibration cache, byte for byte: the warm push must hit the cold push's engine.
    cache = work / "effnet-calib.json"
    with tarfile.open(a.path) as tf:
        member = tf.extractfile("calib.json")
        assert member is not None
        cache.write_bytes(member.read())
    b = _signed(f"{EFFNET} int8 v{warm}", model, work / f"effnet-v{warm}.tegrad", warm, key,
                f"v{cold}'s calib.json", name=EFFNET, config_text=EFFNET_CONFIG, labels=labels,
                golden_inputs=golden_x, golden_count=golden, validation=validation, calibration_cache=cache)
    return a, b


# ---------------------------------------------------------------------------------------------
# pushes, rollbacks, inference checks
# ---------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    upload: float
    stages: dict[str, float]
    stage_wall: float
    activate: float
    total: float
    engine: str = ""
    scores: dict[str, float] = field(default_factory=dict)


def push(admin: AdminClient, bundle: Bundle, auto: bool) -> PushResult:
    t0 = time.perf_counter()
    status = admin.upload(bundle.path)
    t_up = time.perf_counter()
    if not status.complete:
        raise SystemExit(f"{bundle.label}: upload incomplete ({status.received}/{status.total_size} bytes)")
    op = admin.wait(admin.stage(status.sha256, auto_activate=auto).id)
    t_staged = time.perf_counter()
    if state_name(op.state) != "SUCCEEDED":
        raise SystemExit(f"{bundle.label}: staging {state_name(op.state)}: {op.error}")
    if (op.model, op.version) != (bundle.model, bundle.version):
        raise SystemExit(f"{bundle.label}: the operation staged {op.model} v{op.version}")
    stages = {k: float(v) for k, v in op.stage_seconds.items()}
    if auto:
        t_end, activate = t_staged, stages.pop("activate")
    else:
        m = admin.activate(bundle.model, bundle.version)
        t_end = time.perf_counter()
        activate = t_end - t_staged
        if m.active_version != bundle.version:
            raise SystemExit(f"{bundle.label}: Activate returned active version {m.active_version}")
    return PushResult(t_up - t0, stages, t_staged - t_up - (activate if auto else 0.0), activate, t_end - t0,
                      scores=dict(op.validation.scores))


def engine_ids(admin: AdminClient, model: str) -> dict[int, str]:
    (m,) = admin.models(model)
    return {v.version: v.engine_id for v in m.versions}


def rollback(admin: AdminClient, model: str, expect: int) -> float:
    t0 = time.perf_counter()
    m = admin.rollback(model)
    took = time.perf_counter() - t0
    if m.active_version != expect:
        raise SystemExit(f"{model}: rollback went to version {m.active_version}, expected {expect}")
    return took


class Checker:
    """One unversioned inference per activation: the answer must come from the version just activated."""

    def __init__(self, golden: int, image: str | None) -> None:
        x, y = heldout_digits()
        self.digit_x, self.digit_y = x[-1:], int(y[-1])  # the last held-out digit: not among the golden ones
        if image:
            self.image = Path(image)
            self.image_class = -1
        else:
            files, classes = _eval_images(1, skip=golden)  # the first image after the golden samples
            self.image, self.image_class = files[0], classes[0]
        self.image_x = _preprocessed([self.image])
        self.names = [line.split(" ", 1)[1].split(",")[0].strip() for line in
                      (ZOO / "labels" / "imagenet_synset_words.txt").read_text().splitlines()]
        self.odd: list[str] = []

    def check(self, url: str, model: str, version: int) -> str:
        import tritonclient.grpc as grpcclient

        x = self.digit_x if model == "digits" else self.image_x
        with grpcclient.InferenceServerClient(url) as c:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = c.infer(model, [inp])
        served = result.get_response().model_version
        logits = result.as_numpy("logits")[0]
        top = int(logits.argmax())
        if model == "digits":
            text = f"digit {top} (label {self.digit_y})"
        else:
            p = np.exp(logits - logits.max())
            p /= p.sum()
            truth = f", label {self.names[self.image_class]}" if self.image_class >= 0 else ""
            text = f"{self.image.name}: top-1 {top} {self.names[top]!r} p={p[top]:.3f}{truth}"
        if served != str(version):
            self.odd.append(f"{model}: after activating v{version} an unversioned request was answered by v{served}")
            text += f" [ANSWERED BY v{served}, expected v{version}]"
        return f"v{served} -> {text}"


# ---------------------------------------------------------------------------------------------
# one repeat: fresh repository, state and daemon
# ---------------------------------------------------------------------------------------------
def one_repeat(work: Path, trust: Path, pairs: list[tuple[Bundle, Bundle]], checker: Checker, auto: bool
               ) -> tuple[float, dict[str, PushResult], dict[str, float]]:
    start = time.perf_counter()
    device = start_device(work, trust)  # digits v1 fp32 in a fresh repository; admin socket in a short /tmp dir
    ready_seconds = time.perf_counter() - start
    pushes: dict[str, PushResult] = {}
    rollbacks: dict[str, float] = {}
    ok = False
    try:
        _say(f"  tegrad ready in {ready_seconds:.2f} s (digits v1 fp32 built and loaded)")
        with device.admin() as admin:
            for cold, warm in pairs:
                for b, kind in ((cold, "cold"), (warm, "warm")):
                    r = push(admin, b, auto)
                    r.engine = engine_ids(admin, b.model).get(b.version, "")
                    pushes[b.label] = r
                    stages = ", ".join(f"{k} {r.stages.get(k, 0.0):.2f}" for k in STAGES)
                    scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r.scores.items()))
                    _say(f"  {b.label} ({kind}): push->active {r.total:.2f} s (upload {r.upload:.2f}, {stages}, "
                         f"activate {r.activate:.2f}); engine {r.engine}; {scores}")
                    _say(f"    infer: {checker.check(device.server.url, b.model, b.version)}")
                if pushes[warm.label].engine != pushes[cold.label].engine:
                    checker.odd.append(f"{warm.label}: engine {pushes[warm.label].engine} differs from "
                                       f"{cold.label}'s {pushes[cold.label].engine} (expected a cache hit)")
                rollbacks[cold.model] = rollback(admin, cold.model, cold.version)
                _say(f"  {cold.model}: Rollback v{warm.version} -> v{cold.version} in {rollbacks[cold.model]:.3f} s")
                _say(f"    infer: {checker.check(device.server.url, cold.model, cold.version)}")
        ok = True
    finally:
        rc = device.server.stop()
        if rc != 0 or not ok:
            _say(f"tegrad exited with {rc}; last log lines:\n{''.join(device.server.lines[-60:])}")
        shutil.rmtree(device.socket.parent, ignore_errors=True)
    return ready_seconds, pushes, rollbacks


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="fresh daemon + state per repeat (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--calib-images", type=int, default=48, help="EfficientNet calibration images (default: %(default)s)")
    p.add_argument("--algorithm", default="entropy", choices=["max", "entropy", "percentile", "mse"],
                   help="EfficientNet calibration algorithm (default: %(default)s)")
    p.add_argument("--golden", type=int, default=16, help="EfficientNet golden samples (default: %(default)s)")
    p.add_argument("--min-top1-agreement", type=float, default=0.9,
                   help="EfficientNet bundle validation threshold (default: %(default)s; the bundle default 0.99 "
                        "fails at the first disagreement among 16 samples)")
    p.add_argument("--min-cosine", type=float, default=0.95,
                   help="EfficientNet bundle validation threshold (default: %(default)s; bundle default 0.99)")
    p.add_argument("--image", default=None, help="image for the EfficientNet inference check "
                   "(default: the first imagenet_eval image after the golden ones)")
    p.add_argument("--models", default="digits,efficientnet", help="comma-separated subset (default: %(default)s)")
    p.add_argument("--auto-activate", action="store_true",
                   help="Stage(auto_activate=true): activation inside the operation instead of an Activate RPC")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    chosen = {m.strip() for m in args.models.split(",") if m.strip()}
    if not chosen <= {"digits", "efficientnet"}:
        p.error(f"unknown models: {sorted(chosen - {'digits', 'efficientnet'})}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tegrad-rollout-") as tmp:
        work = Path(tmp)
        keys = make_keys(work / "keys")
        key, trust = keys.signer, keys.trust_dir
        _say("making signed bundles (not part of push -> active)")
        pairs = []
        if "digits" in chosen:
            pairs.append(digits_bundles(work / "bundles", key, 2, 3))
        if "efficientnet" in chosen:
            validation = {"task": "classification", "min_top1_agreement": args.min_top1_agreement,
                          "min_cosine": args.min_cosine}
            pairs.append(effnet_bundles(work / "bundles", key, 1, 2, args.calib_images, args.golden, validation,
                                        args.algorithm))
        bundles = [b for pair in pairs for b in pair]
        checker = Checker(args.golden, args.image)

        runs = []
        for i in range(repeats):
            _say(f"repeat {i + 1}/{repeats}")
            runs.append(one_repeat(work / f"run{i}", trust, pairs, checker, args.auto_activate))
            shutil.rmtree(work / f"run{i}", ignore_errors=True)
    elapsed = time.perf_counter() - started

    def med(values: list[float]) -> float:
        return statistics.median(values)

    _say()
    _say("bundle creation (once, on the operator's side; not part of push -> active)")
    _say(_table(["bundle", "MB", "create s", "sign s", "calibration"],
                [[b.label, f"{b.mb:.2f}", f"{b.create_s:.2f}", f"{b.sign_s:.2f}", b.note] for b in bundles], "lrrrl"))
    if "efficientnet" in chosen:
        _say(f"{EFFNET} validation: top-1 agreement >= {args.min_top1_agreement}, cosine >= {args.min_cosine} "
             f"on {args.golden} golden samples (bundle defaults: 0.99 and 0.99)")

    how = "Stage(auto_activate) until SUCCEEDED" if args.auto_activate else "Activate RPC returns"
    _say()
    _say(f"push -> active, seconds, median of {repeats} (fresh daemon, repository and engine cache each repeat); "
         f"end = {how}")
    headers = ["bundle", "engine", "upload", *STAGES, "stage wall", "activate", "push->active", "min", "max"]
    rows = []
    for cold, warm in pairs:
        for b, kind in ((cold, "cold build"), (warm, "cache hit")):
            rs = [run[1][b.label] for run in runs]
            totals = [r.total for r in rs]
            rows.append([b.label, kind, f"{med([r.upload for r in rs]):.3f}",
                         *(f"{med([r.stages.get(s, 0.0) for r in rs]):.3f}" for s in STAGES),
                         f"{med([r.stage_wall for r in rs]):.3f}", f"{med([r.activate for r in rs]):.3f}",
                         f"{med(totals):.3f}", f"{min(totals):.3f}", f"{max(totals):.3f}"])
    _say(_table(headers, rows))
    _say("(columns are medians each on its own, so they need not add up to the push->active median)")

    _say()
    _say(_table(["rollback", "Rollback RPC s (median)", "min", "max"],
                [[f"{cold.model} v{warm.version} -> v{cold.version}", f"{med([r[2][cold.model] for r in runs]):.3f}",
                  f"{min(r[2][cold.model] for r in runs):.3f}", f"{max(r[2][cold.model] for r in runs):.3f}"]
                 for cold, warm in pairs]))
    ready = [r[0] for r in runs]
    _say(f"daemon start -> ready (digits v1 fp32): median {med(ready):.2f} s")

    _say()
    _say("warm vs cold (medians)")
    ratio_rows = []
    for cold, warm in pairs:
        c = [run[1][cold.label] for run in runs]
        w = [run[1][warm.label] for run in runs]
        ct, wt = med([r.total for r in c]), med([r.total for r in w])
        cb, wb = med([r.stages.get("build", 0.0) for r in c]), med([r.stages.get("build", 0.0) for r in w])
        rb = med([r[2][cold.model] for r in runs])
        ratio_rows.append([cold.model, f"{wt / ct:.3f}", f"{ct / wt:.1f}x", f"{wb / cb:.3f}", f"{rb / ct:.3f}"])
    _say(_table(["model", "push->active warm/cold", "cold/warm", "build warm/cold", "rollback/cold push"],
                ratio_rows))
    if checker.odd:
        _say()
        _say("ODD:")
        for line in dict.fromkeys(checker.odd):
            _say(f"  {line}")
    _say(f"\ntotal bench time {elapsed:.0f} s")
    return 1 if checker.odd else 0


if __name__ == "__main__":
    sys.exit(main())
