"""Renders a loaded model as Triton's ModelConfig and ModelMetadata messages."""

from __future__ import annotations

from daemon.monitor.monitor import lookup as monitor_lookup
from daemon.protogen import grpc_service_pb2 as pb
from daemon.protogen import model_config_pb2 as mc

# Triton's platform string for ONNX models; perf_analyzer and clients key on it.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_TYPE = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}


def metadata(lv, versions: list[int]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=lv.name,
        versions=[str(v) for v in versions],
        platform=PLATFORMS[lv.engine.backend],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in lv.inputs],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in lv.outputs],
    )


def model_config(lv) -> mc.ModelConfig:
    cfg = lv.config
    batched = cfg.max_batch > 0
    formats = {t.name: t.format for t in cfg.input}
    labels = {t.name: t.labels for t in cfg.output if t.labels}
    policy = mc.ModelVersionPolicy()
    if cfg.version_policy.all:
        policy.all.SetInParent()
    elif cfg.version_policy.specific is not None:
        policy.specific.versions.extend(cfg.version_policy.specific)
    else:
        policy.latest.num_versions = cfg.version_policy.latest or 1
    kind = "GPU" if lv.engine.backend == "tensorrt" else "CPU"
    out = mc.ModelConfig(
        name=lv.name,
        platform=PLATFORMS[lv.engine.backend],
        backend=lv.engine.backend,
        version_policy=policy,
        max_batch_size=cfg.max_batch,
        default_model_filename=cfg.default_model_filename,
        instance_group=[mc.ModelInstanceGroup(name=f"{lv.name}_{kind.lower()}", kind=mc.ModelInstanceGroup.Kind.Value(f"KIND_{kind}"),
                                              count=cfg.instances)],
    )
    for t in lv.inputs:
        out.input.append(
            mc.ModelInput(
                name=t.name,
                data_type=_TYPE[t.datatype],
                format=mc.ModelInput.Format.Value(f"FORMAT_{formats.get(t.name, 'NONE')}"),
                dims=t.shape[1:] if batched else t.shape,
                optional=t.optional,
            )
        )
    for t in lv.outputs:
        out.output.append(
            mc.ModelOutput(name=t.name, data_type=_TYPE[t.datatype], dims=t.shape[1:] if batched else t.shape,
                           label_filename=labels.get(t.name, ""))
        )
    if batched:
        db = cfg.dynamic_batching
        out.dynamic_batching.preferred_batch_size.extend(db.preferred_batch_sizes)
        out.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_us
        out.dynamic_batching.default_queue_policy.max_queue_size = db.max_queue_size
        out.dynamic_batching.default_queue_policy.default_timeout_microseconds = db.default_timeout_us
        out.dynamic_batching.default_queue_policy.allow_timeout_override = True
    params = {
        "precision": cfg.precision,
        "engine_id": lv.engine.engine_id,
        "calibration_cache_id": lv.prepared.calibration_cache_id,
        **{f"layers_{p}": str(n) for p, n in lv.prepared.layers.items()},
    }
    watch = monitor_lookup(lv.name, lv.version)
    if watch is not None:  # tegrad's own: live precision of this version (see daemon/monitor)
        params.update({f"monitor_{k}": f"{v:.6g}" for k, v in watch.summary().items()})
    for key, value in params.items():
        out.parameters[key].string_value = value
    return out
