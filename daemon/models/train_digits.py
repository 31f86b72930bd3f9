"""Train the embedded default model: a small CNN on scikit-learn's bundled digits data set.

Usage (from the repository root)::

    python3 -m venv /tmp/trainenv
    /tmp/trainenv/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    /tmp/trainenv/bin/python daemon/models/train_digits.py [--out daemon/models/digits]

torch and scikit-learn are needed only here, to (re)build the model; the daemon itself serves the
exported ONNX file and never imports torch. Both are imported lazily, so importing this module
without them installed is harmless.

What it writes under ``--out``:

- ``1/model.onnx``        opset 17, input ``input`` [N,1,8,8] float32 (pixel / 16, so [0, 1]),
                          output ``logits`` [N,10] float32 (raw logits, no softmax), dynamic batch ``N``
- ``labels.txt``          the class names "0" ... "9", one a line
- ``config.toml``         the daemon's model config
- ``data/heldout.npz``    the held-out split: ``x`` uint8 [N,8,8] raw pixels 0..16, ``y`` int64 [N]
- ``data/calib.npz``      256 samples of the TRAIN split for INT8 calibration: ``x`` uint8 [256,8,8]
- ``README.md``           how the model was made, its held-out accuracy (ONNX Runtime) and sha256

The run is deterministic: fixed seeds, one CPU thread, deterministic torch algorithms, and the
split is ``train_test_split(test_size=0.25, random_state=0, stratify=y)`` of ``load_digits()``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
import zipfile
from pathlib import Path

import numpy as np

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
CALIB_SAMPLES = 256
OPSET = 17
MIN_ACCURACY = 0.97

CONFIG_TOML = """\
# Embedded default model: a small CNN trained on scikit-learn's digits by daemon/models/train_digits.py.
# Input: 8x8 grayscale digits scaled to [0, 1] (pixel / 16). Output: raw logits for classes 0-9.
backend = "onnxruntime"
precision = "fp32"
max_batch = 64
# Two single-threaded slots: for a model this small one thread per execution is
# fastest, and two slots use both cores of a small board under concurrency.
instances = 2

[onnxruntime]
intra_op_threads = 1

[dynamic_batching]
max_queue_delay_us = 0

[[input]]
name = "input"
datatype = "FP32"
dims = [1, 8, 8]

[[output]]
name = "logits"
datatype = "FP32"
dims = [10]
labels = "labels.txt"
"""


def normalise(pixels: np.ndarray) -> np.ndarray:
    """Raw digits pixels (0..16) of shape [N,8,8] -> float32 model input [N,1,8,8] in [0, 1]."""
    return (np.asarray(pixels, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def shift_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shift of each [1,8,8] image by -1, 0 or +1 pixels in each axis (zero fill)."""
    n = x.shape[0]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dy = rng.integers(0, 3, size=n)
    dx = rng.integers(0, 3, size=n)
    out = np.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def build_model():
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]

    class ResidualBlock(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv_bn(ch, ch), nn.ReLU(), *conv_bn(ch, ch))
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.body(x) + x)

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                *conv_bn(1, 16),
                nn.ReLU(),
                *conv_bn(16, 32),
                nn.ReLU(),
                nn.MaxPool2d(2),  # 8x8 -> 4x4
                ResidualBlock(32),
                nn.AdaptiveAvgPool2d(1),  # exported as GlobalAveragePool
            )
            self.fc = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.features(x), 1))

    return DigitsNet()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("daemon/models/digits"), help="model directory")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as exc:  # pragma: no cover - CPU supports it, but do not fail the run on it
        print(f"warning: deterministic algorithms unavailable: {exc}")
    rng = np.random.default_rng(SEED)

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    x_tr_raw, x_te_raw, y_tr, y_te = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    x_tr, x_te = normalise(x_tr_raw), normalise(x_te_raw)
    print(f"train {len(y_tr)}  held-out {len(y_te)}")

    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(y_tr) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    x_te_t = torch.from_numpy(x_te)

    def evaluate() -> tuple[float, np.ndarray]:
        model.eval()
        with torch.no_grad():
            logits = model(x_te_t).numpy()
        return float((logits.argmax(1) == y_te).mean()), logits

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = rng.permutation(len(y_tr))
        total = 0.0
        for start in range(0, len(perm), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            xb = torch.from_numpy(shift_batch(x_tr[idx], rng))
            yb = torch.from_numpy(y_tr[idx])
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            acc, _ = evaluate()
            print(f"epoch {epoch + 1:3d}  loss {total / len(perm):.4f}  held-out acc {acc:.4f}")
    train_s = time.perf_counter() - t0
    torch_acc, torch_logits = evaluate()
    print(f"training took {train_s:.1f}s, torch held-out accuracy {torch_acc:.4f}")
    if torch_acc < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {torch_acc:.4f} < {MIN_ACCURACY}")

    out: Path = args.out
    model_path = out / "1" / "model.onnx"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(model_path),
        dynamo=False,
        export_params=True,
        opset_version=OPSET,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )

    # --- verify the exported graph --------------------------------------------------------------
    onnx_model = onnx.load(str(model_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    op_types = sorted({n.op_type for n in onnx_model.graph.node})
    print(f"ONNX op types: {', '.join(op_types)}")
    required = {"Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    if missing := required - set(op_types):
        raise SystemExit(f"exported graph lacks {sorted(missing)}")
    bn = "BatchNormalization nodes" if "BatchNormalization" in op_types else "folded into Conv"
    print(f"BatchNorm: {bn}")

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_te})[0]
    ort_acc = float((ort_logits.argmax(1) == y_te).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"ORT held-out accuracy {ort_acc:.4f} (torch {torch_acc:.4f}), max |logit diff| {max_diff:.2e}")
    if ort_acc != torch_acc or not np.array_equal(ort_logits.argmax(1), torch_logits.argmax(1)):
        raise SystemExit("ONNX Runtime and torch disagree on the held-out split")
    for bs in (1, 64):
        got = sess.run(["logits"], {"input": x_te[:bs]})[0]
        if got.shape != (bs, 10) or not np.allclose(got, torch_logits[:bs], atol=1e-4):
            raise SystemExit(f"batch size {bs}: unexpected output {got.shape}")
    print("batch sizes 1 and 64 OK")

    # --- data, labels, config, README ------------------------------------------------------------
    save_npz(out / "data" / "heldout.npz", x=x_te_raw.astype(np.uint8), y=y_te.astype(np.int64))
    calib_idx = np.sort(np.random.default_rng(SEED).choice(len(y_tr), CALIB_SAMPLES, replace=False))
    save_npz(out / "data" / "calib.npz", x=x_tr_raw[calib_idx].astype(np.uint8))
    (out / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    (out / "config.toml").write_text(CONFIG_TOML)

    data = model_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    n_err = int((ort_logits.argmax(1) != y_te).sum())
    (out / "README.md").write_text(
        f"""# digits — embedded default model

A small CNN classifying scikit-learn's bundled `load_digits()` images (8×8 grayscale, classes 0–9).
It is the daemon's built-in default model and a realistic small graph for quantization tests.

- Graph (`1/model.onnx`, ONNX opset {OPSET}, {len(data)} bytes): conv3x3(1→16)+BN+ReLU →
  conv3x3(16→32)+BN+ReLU → MaxPool 2×2 → residual block [conv3x3(32→32)+BN+ReLU →
  conv3x3(32→32)+BN, Add with the block input, ReLU] → GlobalAveragePool → Flatten → Gemm(32→10).
  Exported in eval mode; BatchNorm is {bn}. Op types: {", ".join(op_types)}.
- Input `input`: float32 [N,1,8,8], **x = pixel / 16** (raw pixels are 0..16, so x is in [0, 1]).
- Output `logits`: float32 [N,10], raw logits (no softmax); class names in `labels.txt`.
- Batch dimension `N` is dynamic.

## Training

```
/tmp/trainenv/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
/tmp/trainenv/bin/python daemon/models/train_digits.py --out daemon/models/digits
```

Split: `train_test_split(test_size=0.25, random_state=0, stratify=y)` → {len(y_tr)} train /
{len(y_te)} held-out. Adam (lr {LR}, one-cycle schedule, weight decay {WEIGHT_DECAY}), batch
{BATCH_SIZE}, {args.epochs} epochs, random ±1 pixel shifts; seeds fixed, one thread, deterministic
algorithms.

## Data

- `data/heldout.npz`: the held-out split, `x` uint8 [{len(y_te)},8,8] raw pixels 0..16, `y` int64.
- `data/calib.npz`: {CALIB_SAMPLES} samples from the train split (never held-out) for INT8 calibration,
  `x` uint8 [{CALIB_SAMPLES},8,8] raw pixels (normalise with /16 like the input).

## Accuracy

Held-out accuracy with ONNX Runtime (CPU): **{ort_acc:.4f}** ({len(y_te) - n_err}/{len(y_te)}),
identical to torch.

## Checksum

`1/model.onnx` sha256: `{sha}`
"""
    )
    print(f"wrote {out} (model {len(data)} bytes, sha256 {sha})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
