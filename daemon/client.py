"""Small gRPC clients behind ``tegrad infer|models|health`` (tegrad's own stubs,
no tritonclient needed on the device)."""

from __future__ import annotations

import sys

import grpc
import numpy as np

from daemon.protogen import grpc_service_pb2 as pb
from daemon.protogen import grpc_service_pb2_grpc as pb_grpc
from daemon.server.tensors import deserialize_bytes_tensor, serialize_bytes_tensor
from daemon.tensor_spec import DATATYPE_TO_NUMPY, datatype_of


def _stub(url: str) -> pb_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    return pb_grpc.GRPCInferenceServiceStub(channel)


def _fail(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def _inputs(args, meta: pb.ModelMetadataResponse, optional: set[str]) -> dict[str, np.ndarray]:
    if args.image:
        names = [t.name for t in meta.inputs if t.datatype == "BYTES"]
        if not names:
            raise SystemExit(f"model {meta.name} takes no images (no BYTES input); its inputs are "
                             + ", ".join(t.name for t in meta.inputs))
        batch = np.empty(len(args.image), dtype=object)
        for i, path in enumerate(args.image):
            with open(path, "rb") as f:
                batch[i] = f.read()
        return {names[0]: batch}
    if args.input:
        arrays = {}
        for item in args.input:
            name, sep, path = item.partition("=")
            if not sep:
                raise SystemExit(f"--input takes NAME=FILE.npy, got {item!r}")
            try:
                arrays[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise SystemExit(f"tegrad infer: error: --input {path}: not a readable .npy file ({exc})") from None
        return arrays
    rng = np.random.default_rng(0)
    arrays = {}
    for t in meta.inputs:
        if t.name in optional and t.datatype == "BYTES":
            continue  # a model that takes images or a tensor: random data only makes sense as the tensor
        arrays[t.name] = random_tensor(t, args.batch, rng)
    return arrays


def random_tensor(t: pb.ModelMetadataResponse.TensorMetadata, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random data for an input of the model's metadata: a variable first dimension is ``batch``,
    other variable dimensions 1."""
    shape = [batch if i == 0 and d == -1 else (d if d > 0 else 1) for i, d in enumerate(t.shape)]
    dtype = DATATYPE_TO_NUMPY[t.datatype]
    if t.datatype == "BYTES":
        return np.full(shape, b"tegrad", dtype=object)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def infer(args) -> int:
    stub = _stub(args.url)
    try:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model, version=args.model_version), timeout=args.timeout)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=args.model, version=args.model_version), timeout=args.timeout).config
        optional = {i.name for i in config.input if i.optional}
        request = pb.ModelInferRequest(model_name=args.model, model_version=args.model_version)
        for name, arr in _inputs(args, meta, optional).items():
            datatype = datatype_of(arr.dtype)
            request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
            request.raw_input_contents.append(serialize_bytes_tensor(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes())
        for out in meta.outputs:
            requested = request.outputs.add(name=out.name)
            if args.top_k:
                requested.parameters["classification"].int64_param = args.top_k
        response = stub.ModelInfer(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"model {response.model_name} version {response.model_version}")
    outputs = list(zip(response.outputs, response.raw_output_contents))
    if {"boxes", "scores", "classes", "count"} <= {out.name for out, _ in outputs}:
        return _print_detections(outputs, "the original image" if args.image else "the network input")
    for out, raw in outputs:
        if out.datatype == "BYTES":
            arr = deserialize_bytes_tensor(raw, None).reshape(out.shape)
            for row in arr.reshape(-1, arr.shape[-1]) if arr.ndim else [arr]:
                print(f"{out.name}: " + "  ".join(v.decode() for v in row))
        else:
            arr = np.frombuffer(raw, dtype=DATATYPE_TO_NUMPY[out.datatype]).reshape(out.shape)
            with np.printoptions(precision=4, threshold=64, suppress=True):
                print(f"{out.name} {out.datatype} {list(out.shape)}:\n{arr}")
    return 0


def _print_detections(outputs, frame: str) -> int:
    """A YOLO [postprocess] answer as one table per image: label (or class id), score, box corners."""
    arrays = {}
    for out, raw in outputs:
        if out.datatype == "BYTES":
            arrays[out.name] = deserialize_bytes_tensor(raw, None).reshape(out.shape)
        else:
            arrays[out.name] = np.frombuffer(raw, dtype=DATATYPE_TO_NUMPY[out.datatype]).reshape(out.shape)
    labels = arrays.get("labels")
    for i, n in enumerate(arrays["count"].tolist()):
        print(f"image {i}: {n} detection{'' if n == 1 else 's'} (boxes x1 y1 x2 y2 in pixels of {frame})")
        if not n:
            continue
        names = [labels[i, j].decode() if labels is not None else str(int(arrays["classes"][i, j])) for j in range(n)]
        width = max(5, *(len(name) for name in names))
        print(f"  {'LABEL':<{width}}  {'SCORE':>6}  {'X1':>7}  {'Y1':>7}  {'X2':>7}  {'Y2':>7}")
        for j in range(n):
            x1, y1, x2, y2 = arrays["boxes"][i, j].tolist()
            print(f"  {names[j]:<{width}}  {arrays['scores'][i, j]:6.3f}  {x1:7.1f}  {y1:7.1f}  {x2:7.1f}  {y2:7.1f}")
    return 0


def _live_precision(params: dict[str, str]) -> tuple[str, str]:
    """The precision monitor's window values from ModelConfig parameters ('-' when not monitored)."""
    shown = [f"{k}={params['monitor_' + k]}" for k in ("top1_agreement", "cosine", "f1", "max_rel_error")
             if "monitor_" + k in params]
    if shown and "monitor_samples" in params:
        shown.append(f"n={params['monitor_samples']}")
    drift = params.get("monitor_drift")
    return (" ".join(shown) or "-", drift if drift is not None else "-")


def models(args) -> int:
    stub = _stub(args.url)
    try:
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=args.ready), timeout=10)
    except grpc.RpcError as exc:
        return _fail(exc)
    headers = ("MODEL", "VERSION", "STATE", "BACKEND", "PRECISION", "ENGINE", "CALIBRATION", "LAYERS(i8/f16/f32)",
               "AGREEMENT", "DRIFT")
    rows = []
    for m in index.models:
        engine = ("-",) * 7
        if m.state == "READY":
            try:
                config = stub.ModelConfig(pb.ModelConfigRequest(name=m.name, version=m.version), timeout=10).config
                p = {k: v.string_value for k, v in config.parameters.items()}
                # A TensorRT engine reports layers_<precision>@<device>; the column sums the devices.
                layers = "/".join(str(sum(int(v) for k, v in p.items() if k.partition("@")[0] == f"layers_{x}"))
                                  for x in ("int8", "fp16", "fp32"))
                dla = sum(int(v) for k, v in p.items() if k.startswith("layers_") and k.endswith("@dla"))
                layers += f" (dla {dla})" if dla else ""
                engine = (config.backend, p.get("precision", "?"), p.get("engine_id", "?"),
                          p.get("calibration_cache_id") or "-", layers, *_live_precision(p))
            except grpc.RpcError:  # unloaded between the two calls
                pass
        rows.append((m.name, m.version or "-", m.state or "-", *engine, m.reason))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print("  ".join(f"{h:<{w}}" for h, w in zip(headers, widths)) + "  REASON")
    for row in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + f"  {row[-1]}")
    return 0


def health(args) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(args.url)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail(exc)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
