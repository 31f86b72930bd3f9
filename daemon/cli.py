"""``tegrad`` command line: the daemon, small clients for it, and the calibration tools."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from daemon import __version__
from daemon.state_dir import default_state_dir


def _bool(text: str) -> bool:
    """Triton spells its switches --flag=true|false."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the inference daemon (KServe v2 gRPC on :8001, Prometheus metrics on :8002)",
        description="Serve models over Triton's KServe v2 gRPC protocol. With no --model-repository, "
        "serves the embedded default model (digits).",
    )
    p.add_argument("--model-repository", type=Path, help="repository root: <repo>/<model>/config.toml and <repo>/<model>/<version>/model.onnx")
    p.add_argument("--model-control", choices=["none", "explicit"], default="none",
                   help="none: load every model at startup, no load/unload RPCs; explicit: load what --load-model names "
                        "(and what was loaded before a restart), load/unload over gRPC (default: %(default)s)")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME", help="with explicit control: load NAME at startup ('*' for all); repeatable")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(), help="where the SQLite state lives (default: %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024, help="largest request accepted; larger ones get RESOURCE_EXHAUSTED (default: %(default)s)")
    from daemon.rollout.cli import positive_int

    p.add_argument("--max-decode-bytes", type=positive_int, default=None, metavar="BYTES",
                   help="memory all requests' images may hold at once while decoded, queued and preprocessed; "
                        "beyond it requests wait their turn, and one that needs more is refused with "
                        "RESOURCE_EXHAUSTED (default: 512 MiB)")
    p.add_argument("--grpc-max-concurrent-streams", type=int, default=256, metavar="N",
                   help="HTTP/2 streams (calls in progress) per client connection; more wait in the client (default: %(default)s)")
    p.add_argument("--max-inflight-request-mb", type=int, default=512, metavar="MB",
                   help="inference request bytes parsed, decoded and run at once, daemon-wide; more wait for room "
                        "until their deadline, then get RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--grpc-restricted-protocol", action="append", default=[], metavar="PROTOCOL[,PROTOCOL...]:KEY=VALUE",
                   help="as in Triton: answer these protocols (health, metadata, inference, shared-memory, model-config, "
                        "model-repository, statistics, trace, logging) only for clients sending the header "
                        "triton-grpc-protocol-KEY: VALUE; repeatable")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let in-flight requests finish on SIGTERM (default: %(default)s)")
    p.add_argument("--engine-cache-dir", type=Path, default=None,
                   help="where built engines are kept, keyed by content (default: <state-dir>/engines)")
    p.add_argument("--engine-cache-max-mb", type=int, default=8192,
                   help="engine cache size limit; least recently used engines are deleted beyond it (default: %(default)s)")
    p.add_argument("--build-jobs", type=int, default=1,
                   help="engine builds that may run at once, each in its own worker process (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--strict-readiness", type=_bool, default=True, metavar="true|false",
                   help="true: the server is ready only when every model that should load is READY; false: ready "
                        "once started, whatever the models' states (Triton's flag; default: true)")
    p.add_argument("--exit-on-error", type=_bool, default=True, metavar="true|false",
                   help="true: a model that fails to load at startup stops the daemon with the reason (exit code 1); "
                        "false: serve the models that did load (Triton's flag; default: true)")
    s = p.add_argument_group("system shared memory (Triton's extension)")
    s.add_argument("--allow-shared-memory", action="store_true",
                   help="let local clients register POSIX shared-memory regions for tensors (Triton: --allow-client-shm)")
    s.add_argument("--shared-memory-max-regions", type=int, default=64,
                   help="most regions registered at once (default: %(default)s)")
    s.add_argument("--shared-memory-max-mb", type=float, default=1024,
                   help="largest total size of the registered regions (default: %(default)s)")
    p.add_argument("--telemetry-period", type=float, default=1.0, metavar="SECONDS",
                   help="read Jetson/GPU telemetry every SECONDS for /metrics; 0 = off (default: %(default)s)")
    p.add_argument("--telemetry-root", type=Path, default=Path("/"), metavar="DIR",
                   help="where the device's /sys, /proc and /etc are mounted, e.g. the host's in a container (default: /)")
    r = p.add_argument_group("rollouts (admin API, signed bundles)")
    r.add_argument("--admin-socket", default=None, metavar="PATH",
                   help="Unix socket of the admin API, owner-only (default: <state-dir>/admin.sock; '' turns it off)")
    r.add_argument("--admin-listen", default="", metavar="HOST:PORT",
                   help="also serve the admin API on TCP, only with TLS and client certificates (the three below)")
    r.add_argument("--admin-tls-cert", type=Path, help="server certificate (PEM) for --admin-listen")
    r.add_argument("--admin-tls-key", type=Path, help="its private key (PEM)")
    r.add_argument("--admin-client-ca", type=Path, help="CA certificate(s) (PEM) that client certificates must chain to")
    r.add_argument("--trust-dir", type=Path, default=None,
                   help="public keys (*.pub) whose bundle signatures are trusted (default: <state-dir>/trusted-keys)")
    r.add_argument("--allow-unsigned", action="store_true",
                   help="DEVELOPMENT ONLY: install bundles without a valid signature (logged loudly)")
    r.add_argument("--keep-versions", type=int, default=3,
                   help="versions kept per model (files and engines) for rollback; older ones are deleted (default: %(default)s)")
    r.add_argument("--auto-activate", action="store_true", help="activate every bundle whose validation passes")
    r.add_argument("--dropbox", type=Path, default=None, metavar="DIR",
                   help="stage *.tegrad bundles that appear in DIR (results in DIR/results/)")
    r.add_argument("--max-bundle-mb", type=float, default=4096, help="largest bundle accepted (default: %(default)s)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import asyncio

    from daemon.server.app import ServeOptions, serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from daemon.engines.tensorrt.platform import describe

    logging.getLogger("tegrad").info("platform: %s", describe())
    opts = ServeOptions(
        repository=args.model_repository,
        model_control=args.model_control,
        load_models=args.load_model,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        state_dir=args.state_dir,
        max_message_bytes=args.max_message_bytes,
        max_decode_bytes=args.max_decode_bytes,
        drain_timeout=args.drain_timeout,
        grpc_max_concurrent_streams=max(1, args.grpc_max_concurrent_streams),
        max_inflight_request_bytes=max(1, args.max_inflight_request_mb) << 20,
        restricted_protocols=args.grpc_restricted_protocol,
        engine_cache_dir=args.engine_cache_dir,
        engine_cache_max_bytes=args.engine_cache_max_mb << 20,
        build_jobs=args.build_jobs,
        admin_socket=args.admin_socket,
        admin_listen=args.admin_listen,
        admin_tls_cert=args.admin_tls_cert,
        admin_tls_key=args.admin_tls_key,
        admin_client_ca=args.admin_client_ca,
        trust_dir=args.trust_dir,
        allow_unsigned=args.allow_unsigned,
        keep_versions=max(1, args.keep_versions),
        auto_activate=args.auto_activate,
        dropbox=args.dropbox,
        max_bundle_bytes=int(args.max_bundle_mb * (1 << 20)),
        allow_shared_memory=args.allow_shared_memory,
        shared_memory_max_regions=args.shared_memory_max_regions,
        shared_memory_max_bytes=int(args.shared_memory_max_mb * (1 << 20)),
        telemetry_period=args.telemetry_period,
        telemetry_root=args.telemetry_root,
        strict_readiness=args.strict_readiness,
        exit_on_error=args.exit_on_error,
    )
    return asyncio.run(serve(opts))


def _add_clients(sub) -> None:
    p = sub.add_parser("infer", help="send one inference request and print the outputs (or top-k classes)")
    p.add_argument("-m", "--model", default="digits", help="model name (default: %(default)s)")
    p.add_argument("--model-version", default="", help="version (default: the latest ready)")
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="input tensor from a .npy file; repeatable. Without any, random data shaped like the model's inputs is sent")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="send this JPEG/PNG to a model that takes images (repeat for a batch)")
    p.add_argument("-b", "--batch", type=int, default=1, help="batch size for random inputs (default: %(default)s)")
    p.add_argument("-k", "--top-k", type=int, default=0, help="ask for the top K classes of each output (classification extension)")
    p.add_argument("--url", default="localhost:8001", help="server address (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="gRPC deadline in seconds (default: %(default)s)")
    p.set_defaults(func=lambda a: _client("infer", a))

    p = sub.add_parser("models", help="list the repository's models, versions and states")
    p.add_argument("--url", default="localhost:8001", help="server address (default: %(default)s)")
    p.add_argument("--ready", action="store_true", help="only ready versions")
    p.set_defaults(func=lambda a: _client("models", a))

    p = sub.add_parser("health", help="gRPC health check; exit 0 when the server is SERVING")
    p.add_argument("--url", default="localhost:8001", help="server address (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default: %(default)s)")
    p.set_defaults(func=lambda a: _client("health", a))


def _add_selftest(sub) -> None:
    p = sub.add_parser(
        "selftest",
        help="build the embedded digits model on every backend and precision available here and compare with FP32",
        description="Builds the embedded digits model for each available backend (ONNX Runtime; TensorRT when "
        "installed with a GPU) and precision, runs the held-out digits, and prints build time, latency, top-1 "
        "agreement with FP32 ONNX Runtime and accuracy.",
    )
    p.add_argument("--precisions", default="fp32,fp16,int8,mixed", help="comma-separated (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="engine cache to use (default: a temporary one, so builds are timed)")
    p.set_defaults(func=_selftest)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer precision and device of a model's built engine (from the engine cache)",
                       description="Prints what a model's engine runs in, layer by layer: for TensorRT the built "
                       "engine's inspector (precision, GPU or DLA), for ONNX Runtime the lowered ONNX's count.")
    p.add_argument("model")
    p.add_argument("--model-version", type=int, default=None, help="this version only (default: the newest)")
    p.add_argument("--all", action="store_true", help="every cached engine of the model, not only the newest")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(), help="as given to tegrad serve (default: %(default)s)")
    p.add_argument("--engine-cache-dir", type=Path, default=None, help="as given to tegrad serve (default: <state-dir>/engines)")
    p.set_defaults(func=_inspect)


def _inspect(args) -> int:
    from daemon.engines import inspect

    return inspect.run(args)


def _selftest(args) -> int:
    from daemon import selftest

    return selftest.run(args)


def _add_import_triton(sub) -> None:
    p = sub.add_parser(
        "import-triton",
        help="convert a Triton model folder's config.pbtxt into tegrad's config.toml",
        description="Reads <model dir>/config.pbtxt (Triton's ModelConfig text format) and writes "
        "<model dir>/config.toml next to it, then prints what was and was not converted. Keys that change "
        "what the model is (ensembles, python backend, sequence batching, TensorRT plans) are refused.",
    )
    p.add_argument("model_dir", type=Path, nargs="+", help="Triton model folder (holding config.pbtxt), or the file itself")
    p.add_argument("--force", action="store_true", help="overwrite an existing config.toml")
    p.set_defaults(func=_import_triton)


def _import_triton(args) -> int:
    from daemon import triton_import

    return triton_import.run(args)


def _client(command: str, args) -> int:
    from daemon import client

    return getattr(client, command)(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tegrad",
        description="On-device inference daemon for NVIDIA Jetson: Triton-compatible KServe v2 gRPC, "
        "TensorRT or ONNX Runtime engines, portable INT8 calibration.",
    )
    parser.add_argument("--version", action="version", version=f"tegrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_clients(sub)
    _add_selftest(sub)
    _add_inspect(sub)
    _add_import_triton(sub)
    from daemon import perf

    perf.register(sub)
    from daemon.rollout import cli as rollout_cli

    rollout_cli.register(sub)
    from daemon.rollout import admin_cli

    admin_cli.register(sub)
    try:
        from calib import cli as calib_cli
    except ImportError:  # calibration tools are optional at import time
        calib_cli = None
    if calib_cli is not None and hasattr(calib_cli, "register"):
        calib_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from daemon import cli_files

    refused = cli_files.check(args)
    if refused is not None:
        return refused
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
