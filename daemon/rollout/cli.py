"""``tegrad bundle keygen | create | sign | verify | inspect``.

``register(subparsers)`` adds ``bundle`` to the daemon's parser; ``main`` runs
it standalone. Exit codes: 0 success, 2 a refused bundle or bad input, 130
interrupted. Heavy imports (onnx, ONNX Runtime, cryptography) happen inside the
commands so that ``tegrad --help`` works without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_THRESHOLDS = ("min_top1_agreement", "min_cosine", "min_f1", "max_rel_error")


def cmd_keygen(args: argparse.Namespace) -> int:
    from daemon.rollout import signing

    key, pub, kid = signing.generate_keypair(args.out, args.name)
    print(f"wrote {key} (private: keep it on the signing machine only)")
    print(f"wrote {pub} (public: copy it into each device's trust directory)")
    print(f"key id {kid}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from daemon.rollout import bundle, make

    overrides = {k: getattr(args, k) for k in _THRESHOLDS if getattr(args, k) is not None}
    if args.model_version is not None:
        logging.getLogger("tegrad.bundle").warning(
            "--model-version is deprecated: it picks the source folder <model>/%d and ships it as version %d. "
            "Give the source as a path (%s/%d) and the shipped version with --version %d.",
            args.model_version, args.model_version, args.model.rstrip("/"), args.model_version, args.model_version)
    manifest = make.create(
        args.model,
        args.out,
        name=args.name,
        version=args.version or args.model_version,
        source_version=args.model_version,
        config_text=Path(args.config).read_text(encoding="utf-8") if args.config else None,
        calibration_cache=args.calibration_cache,
        labels=args.labels,
        golden_inputs=args.golden_inputs,
        golden_count=args.golden_count,
        golden_scale=args.golden_scale,
        validation=bundle.validation_for(args.task, **overrides),
        calibrate_data=args.calibrate_data,
        calibrate_algorithm=args.calibrate_algorithm,
        min_tegrad_version=args.min_tegrad_version,
        created=args.created,
    )
    print(f"wrote {args.out}: {manifest.model} v{manifest.version} ({manifest.precision}), "
          f"{len(manifest.members)} members, {manifest.golden.count} golden samples")
    if args.key:
        kid = make.sign_bundle(args.out, args.key)
        print(f"signed with key {kid}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from daemon.rollout import make

    kid = make.sign_bundle(args.bundle, args.key, args.out)
    print(f"signed {args.out or args.bundle} with key {kid}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from daemon.rollout import bundle, signing

    if args.trust is None and not args.allow_unsigned:
        raise bundle.BundleError("give --trust DIR (the trusted .pub keys), or --allow-unsigned in development")
    trust = signing.TrustStore(args.trust) if args.trust is not None else None
    vb = bundle.open_bundle(args.bundle, trust, allow_unsigned=args.allow_unsigned,
                            max_bytes=args.max_bytes or bundle.DEFAULT_MAX_BYTES)
    m = vb.manifest
    who = f"signed by trusted key {vb.signer} ({vb.signer_key})" if vb.verified else "UNVERIFIED (no valid signature)"
    print(f"OK {args.bundle}: {m.model} v{m.version} ({m.precision}), {len(m.members)} members match, {who}")
    if args.validate:
        return _validate(vb, args)
    if args.extract_to:
        dest = vb.extract_to(args.extract_to)
        print(f"extracted to {dest}")
    return 0


def _validate(vb: Any, args: argparse.Namespace) -> int:
    """Build the bundle's engine as a device would (lowering, build worker) and check its golden samples."""
    import asyncio
    import tempfile

    from daemon.engines.cache import EngineCache
    from daemon.engines.factory import EngineFactory
    from daemon.engines.worker import BuildPool
    from daemon.errors import TegradError
    from daemon.rollout.stage import stage

    with tempfile.TemporaryDirectory(prefix="tegrad-validate-") as tmp:
        model_dir = Path(args.extract_to) if args.extract_to else Path(tmp) / "model"
        cache = EngineCache(Path(args.engine_cache) if args.engine_cache else Path(tmp) / "engines", 1 << 40)
        try:
            staged = asyncio.run(stage(vb, model_dir, EngineFactory(cache, BuildPool())))
        except TegradError as exc:
            print(f"FAILED to build the engine: {exc}")
            return 1
        staged.prepared.engine.close()
    p, r = staged.prepared, staged.report
    layers = "/".join(str(p.layers.get(k, 0)) for k in ("int8", "fp16", "fp32"))
    print(f"engine {p.key[:16]} ({p.engine.backend}, {vb.manifest.precision}, layers int8/fp16/fp32 {layers})")
    print(r.summary())
    return 0 if r.passed else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from daemon.rollout import bundle

    info = bundle.read_manifest(args.bundle, max_bytes=args.max_bytes or bundle.DEFAULT_MAX_BYTES)
    if args.json:
        doc = {"manifest": info.manifest.model_dump(mode="json"), "signer": info.signer,
               "signature_problem": info.signature_problem}
        print(json.dumps(doc, indent=2))
        return 0
    print(format_summary(info))
    return 0


def format_summary(info: Any) -> str:
    m = info.manifest
    if info.signature_problem:
        sig = f"present but unreadable: {info.signature_problem}"
    elif info.signer:
        sig = f"key {info.signer} (not checked here; `tegrad bundle verify --trust DIR` checks it)"
    else:
        sig = "none (unsigned)"
    width = max(len(n) for n in m.members)
    total = sum(mi.size for mi in m.members.values()) or 1
    lines = [
        f"bundle      {info.path} ({info.size} bytes)",
        f"model       {m.model} version {m.version}",
        f"precision   {m.precision}",
        f"created     {m.created}, needs tegrad >= {m.min_tegrad_version}",
        f"signature   {sig}",
        f"calibration {m.calibration_cache or 'none'}",
        f"members     (size in the bundle; {GOLDEN_NOTE})",
        *(f"  {n:<{width}}  {human_size(mi.size):>9}  {100 * mi.size / total:5.1f} %  sha256 {mi.sha256[:16]}…"
          for n, mi in m.members.items()),
        f"golden      {m.golden.count} samples; inputs {', '.join(m.golden.inputs)}; "
        f"outputs {', '.join(m.golden.outputs)}",
        f"validation  {m.validation.task}: " + ", ".join(
            f"{k} {getattr(m.validation, k)}" for k in _THRESHOLDS if getattr(m.validation, k) is not None),
    ]
    return "\n".join(lines)


GOLDEN_NOTE = "golden.npz is deflated"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def command(func: Callable[[argparse.Namespace], int], name: str) -> Callable[[argparse.Namespace], int]:
    """``func`` as a command ``tegrad <name>`` (also ``tegrad push`` / ``rollout``): refused input, files and
    RPCs become one line on stderr and exit 2; Ctrl-C exits 130."""
    def run(args: argparse.Namespace) -> int:
        import grpc

        # The --allow-unsigned warning is a log record; it must reach the terminal even without `serve`.
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return func(args)
        except grpc.RpcError as exc:  # the admin API refused, or the device could not be reached
            print(f"tegrad {name}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        except (ValueError, OSError) as exc:  # BundleError is a ValueError
            print(f"tegrad {name}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"tegrad {name}: interrupted", file=sys.stderr)
            return 130

    return run


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(subparsers: Any) -> None:
    """Add ``bundle`` with its subcommands to ``subparsers``."""
    p = subparsers.add_parser("bundle", help="make, sign, verify and inspect signed model bundles",
                              description="A bundle is one tar file carrying a model version, its config, "
                                          "calibration cache, labels and golden samples, signed with Ed25519.")
    sub = p.add_subparsers(dest="bundle_command", metavar="{keygen,create,sign,verify,inspect}")
    sub.required = True

    k = sub.add_parser("keygen", help="make an Ed25519 signing key pair (NAME.key, NAME.pub)")
    k.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    k.add_argument("--name", default="tegrad", help="file name stem (default: %(default)s)")
    k.set_defaults(func=command(cmd_keygen, "bundle keygen"))

    c = sub.add_parser("create", help="make a bundle: hashes, golden FP32 outputs, optional calibration",
                       description="MODEL is a model directory (config.toml and model.onnx or <version>/model.onnx; "
                                   "the newest version is taken), a version directory (repo/digits/2) or a .onnx "
                                   "file (then give --config and --name).")
    c.add_argument("model", help="model directory, version directory or .onnx file")
    c.add_argument("-o", "--out", required=True, help="bundle file to write")
    c.add_argument("--name", help="model name (default: the model directory's name)")
    c.add_argument("--version", type=positive_int, dest="version",
                   help="the version the bundle installs as on the device (default: the source version "
                        "directory's number, else 1)")
    c.add_argument("--model-version", type=positive_int, help=argparse.SUPPRESS)  # deprecated: source and version
    c.add_argument("--config", help="config.toml (default: the one in the model directory)")
    c.add_argument("--calibration-cache", help="calibration cache, tegrad JSON or TensorRT text "
                                               "(default: what config.toml names)")
    c.add_argument("--labels", help="labels file (default: what config.toml names)")
    c.add_argument("--golden-inputs", required=True, action="append", metavar="PATH",
                   help="golden samples: images or folders of images (preprocessed with config.toml's "
                        "[preprocess]), or tensors: .npz keyed by input name (one input: key 'x' or a single "
                        "array; other keys such as labels 'y' are ignored), .npy for one input; repeatable")
    c.add_argument("--golden-scale", type=float, metavar="S",
                   help="multiply tensor samples by S first (heldout.npz holds raw 0..16 pixels: 0.0625)")
    c.add_argument("--golden-count", type=positive_int, default=8, help="samples kept (default: %(default)s)")
    c.add_argument("--task", choices=("classification", "detection", "regression"), default="classification",
                   help="how device outputs are compared with the golden ones (default: %(default)s)")
    for t in _THRESHOLDS:
        c.add_argument(f"--{t.replace('_', '-')}", dest=t, type=float, help="override the task's default")
    c.add_argument("--calibrate-data", metavar="NPY|NPZ", help="calibrate on these inputs when no cache is given")
    c.add_argument("--calibrate-algorithm", choices=("auto", "max", "entropy", "percentile", "mse"), default="auto",
                   help="as tegrad calibrate's --algorithm (default: %(default)s)")
    c.add_argument("--min-tegrad-version", help="oldest tegrad that may install it (default: this one)")
    c.add_argument("--created", metavar="YYYY-MM-DDTHH:MM:SSZ",
                   help="timestamp to record (default: $SOURCE_DATE_EPOCH or now); fix it for identical bytes")
    c.add_argument("--key", help="sign with this private key right away")
    c.set_defaults(func=command(cmd_create, "bundle create"))

    s = sub.add_parser("sign", help="add or replace the bundle's Ed25519 signature")
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="private key (NAME.key from keygen)")
    s.add_argument("-o", "--out", help="write the signed bundle here (default: in place)")
    s.set_defaults(func=command(cmd_sign, "bundle sign"))

    v = sub.add_parser("verify", help="check signature, hashes and contents; optionally extract",
                       description="Checks everything a device checks before installing. Exit 0 when the "
                                   "bundle would be accepted.")
    v.add_argument("bundle")
    v.add_argument("--trust", metavar="DIR", help="directory of trusted public keys (*.pub)")
    v.add_argument("--allow-unsigned", action="store_true",
                   help="DEVELOPMENT ONLY: accept a missing or invalid signature (logged as a warning)")
    v.add_argument("--extract-to", metavar="DIR", help="after checking, extract into this new directory")
    v.add_argument("--validate", action="store_true",
                   help="also build the engine here (lowering with the shipped cache, build worker) and check the "
                        "golden samples against the manifest's thresholds; exit 1 when they fail")
    v.add_argument("--engine-cache", metavar="DIR", help="with --validate: engine cache to use (default: a temporary one)")
    v.add_argument("--max-bytes", type=positive_int, default=None,
                   help="refuse bundles larger than this (default: 4 GiB)")
    v.set_defaults(func=command(cmd_verify, "bundle verify"))

    i = sub.add_parser("inspect", help="show what the manifest says (checks nothing; use verify for that)")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--max-bytes", type=positive_int, default=None, help=argparse.SUPPRESS)
    i.set_defaults(func=command(cmd_inspect, "bundle inspect"))


def build_parser(prog: str = "tegrad") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="tegrad model bundles")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
