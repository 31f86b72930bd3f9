"""Post-processing on the GPU with pycuda (kernels/postprocess.cu): only final results come back.

Classification runs softmax + top-k; detection runs decode with score filtering into a compact
candidate list, a rank sort, and class-aware NMS that also maps boxes back to the original
images. The host then reads ``N*k`` (or ``N*K*6 + N``) numbers: from mapped memory in place on
integrated GPUs (Jetson), else after one copy into pinned memory.

Like :class:`daemon.processing.gpu.GpuPreprocessor`, one instance belongs to one slot's thread.
``enqueue`` can start after the engine's event (``wait_for``) without the host waiting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from calib.detection import yolox_grids
from calib.preprocess import Transform
from daemon.device_tensor import DeviceTensor
from daemon.errors import InvalidArgument
from daemon.processing.cpu import label_tensor
from daemon.processing.device import Gpu, HostResult, elapsed_ms
from daemon.processing.spec import PostprocessConfig

_VARIANTS = {"yolox": 0, "yolov5": 1, "yolov8": 2}
_CANDIDATE_BYTES = 32
_BLOCK = 256


class GpuPostprocessor:
    """Model output to the KServe tensors of ``config.kind`` (not 'raw': that needs no work).

    ``output_shape`` is the model output's shape without the batch dimension; ``input_hw`` the
    model input (height, width), needed by YOLOX to rebuild its grids.
    """

    def __init__(
        self,
        config: PostprocessConfig,
        output_shape: Sequence[int],
        max_batch: int,
        labels: Sequence[str] = (),
        input_hw: tuple[int, int] | None = None,
        device: int = 0,
        stream=None,
    ) -> None:
        if config.kind not in ("classification", "yolo"):
            raise ValueError(f"postprocess.kind: {config.kind!r} has no GPU kernels (it needs none)")
        self.config = config
        self.labels = tuple(labels)
        self.max_batch = max(1, int(max_batch))
        self.output_shape = tuple(int(d) for d in output_shape)
        if any(d < 1 for d in self.output_shape):
            raise ValueError(f"postprocess: GPU post-processing needs a fixed output shape, got {list(output_shape)}")
        self._sample = math.prod(self.output_shape)
        self.gpu = Gpu(device)
        self._freed = False
        self._pending = False
        self._n = 0
        with self.gpu.active() as cuda:
            self.stream = stream if stream is not None else cuda.Stream()
            self.start, self.decoded, self.done = cuda.Event(), cuda.Event(), cuda.Event()
            self._pred_host = self.gpu.pinned(self.max_batch * self._sample, np.float32)
            self._pred_dev = cuda.mem_alloc(self._pred_host.nbytes)
            self._allocs = [self._pred_dev]
            if config.kind == "classification":
                self._init_classification()
            else:
                self._init_yolo(cuda, input_hw)

    # ------------------------------------------------------------------------ set-up

    def _init_classification(self) -> None:
        self._classes = self._sample
        k = self.config.top_k
        self._softmax_topk = self.gpu.function("postprocess.cu", "softmax_topk", "PiiiPP")
        self._result = HostResult(self.gpu, self.max_batch * k * 8)

    def _init_yolo(self, cuda, input_hw: tuple[int, int] | None) -> None:
        cfg = self.config
        if len(self.output_shape) != 2:
            raise ValueError(f"postprocess: {cfg.variant} output must be 2-D per image, got {list(self.output_shape)}")
        if cfg.variant == "yolov8":
            channels, self._anchors = self.output_shape
            self._classes = channels - 4
        else:
            self._anchors, channels = self.output_shape
            self._classes = channels - 5
        if self._classes < 1:
            raise ValueError(f"postprocess: output shape {list(self.output_shape)} leaves no class scores for {cfg.variant}")
        grid = np.zeros((1, 3), np.float32)
        if cfg.variant == "yolox":
            if input_hw is None:
                raise ValueError("postprocess: YOLOX decoding needs the model input size (a [preprocess] size)")
            cells, strides = yolox_grids(input_hw, cfg.strides)
            if cells.shape[0] != self._anchors:
                raise ValueError(
                    f"postprocess: YOLOX output has {self._anchors} anchors but input {tuple(input_hw)} with strides "
                    f"{tuple(cfg.strides)} gives {cells.shape[0]}"
                )
            grid = np.ascontiguousarray(np.concatenate([cells, strides[:, None]], axis=1), dtype=np.float32)
        self._grid = cuda.to_device(grid)
        slots = self.max_batch * self._anchors
        self._cand = cuda.mem_alloc(slots * _CANDIDATE_BYTES)
        self._sorted = cuda.mem_alloc(slots * _CANDIDATE_BYTES)
        self._removed = cuda.mem_alloc(slots)
        self._count = cuda.mem_alloc(self.max_batch * 4)
        self._transforms_host = self.gpu.pinned(self.max_batch * 6, np.float64)
        self._transforms_dev = cuda.mem_alloc(self._transforms_host.nbytes)
        self._allocs += [self._grid, self._cand, self._sorted, self._removed, self._count, self._transforms_dev]
        k = cfg.max_detections
        self._result = HostResult(self.gpu, self.max_batch * (k * 6 + 1) * 4)
        self._decode = self.gpu.function("postprocess.cu", "yolo_decode", "PiiiPfPP")
        self._rank = self.gpu.function("postprocess.cu", "yolo_rank", "PPiP")
        self._nms = self.gpu.function("postprocess.cu", "yolo_nms", "PPifiiPiPPPPP")

    # ------------------------------------------------------------------------ running

    def _stage(self, pred: DeviceTensor | np.ndarray) -> tuple[int | None, int]:
        """Check the batch; host outputs are copied into pinned memory (device pointer None)."""
        if isinstance(pred, DeviceTensor):
            if np.dtype(pred.dtype) != np.float32:
                raise InvalidArgument(f"postprocess: GPU kernels read FP32 outputs, got {np.dtype(pred.dtype)}")
            n, shape, ptr = pred.shape[0], tuple(pred.shape[1:]), pred.ptr
        else:
            arr = np.asarray(pred)
            n, shape, ptr = arr.shape[0], tuple(arr.shape[1:]), None
        if math.prod(shape) != self._sample or (self.config.kind == "yolo" and shape != self.output_shape):
            raise InvalidArgument(f"postprocess: model output per image has shape {list(shape)}, "
                                  f"expected {list(self.output_shape)}")
        if not 0 < n <= self.max_batch:
            raise InvalidArgument(f"postprocess: batch of {n}; this model takes 1 to {self.max_batch}")
        if ptr is None:
            np.copyto(self._pred_host[: n * self._sample].reshape(arr.shape), arr, casting="same_kind")
        return ptr, n

    def enqueue(
        self, pred: DeviceTensor | np.ndarray, transforms: Sequence[Transform] | None = None, wait_for=None
    ) -> None:
        """Queue the kernels for one batch; ``wait_for`` is an event (e.g. the engine's) to start after."""
        with self.gpu.active() as cuda:
            if self._pending:
                # One batch at a time: its pinned input and result buffers are about to be reused.
                self.done.synchronize()
            ptr, n = self._stage(pred)
            if transforms is not None and len(transforms) != n:
                raise InvalidArgument(f"postprocess: {n} outputs for {len(transforms)} images")
            if wait_for is not None:
                self.stream.wait_for_event(wait_for)
            self.start.record(self.stream)
            if ptr is None:
                cuda.memcpy_htod_async(self._pred_dev, self._pred_host[: n * self._sample], self.stream)
                ptr = int(self._pred_dev)
            self._n = n
            if self.config.kind == "classification":
                self._enqueue_classification(cuda, ptr, n)
            else:
                self._enqueue_yolo(cuda, ptr, n, transforms)
            self.done.record(self.stream)
            self._pending = True

    def _enqueue_classification(self, cuda, ptr: int, n: int) -> None:
        k = self.config.top_k
        res = self._result.ptr
        self.decoded.record(self.stream)
        self._softmax_topk.prepared_async_call(
            (n, 1, 1), (_BLOCK, 1, 1), self.stream, ptr, self._classes, k, int(self.config.softmax), res, res + n * k * 4
        )
        self._result.fetch(cuda, n * k * 8, self.stream)

    def _enqueue_yolo(self, cuda, ptr: int, n: int, transforms: Sequence[Transform] | None) -> None:
        cfg, A, K = self.config, self._anchors, self.config.max_detections
        if transforms is not None:
            tf = self._transforms_host[: 6 * n].reshape(n, 6)
            for i, t in enumerate(transforms):
                tf[i] = (t.scale_x, t.scale_y, t.offset_x, t.offset_y, t.src_size[1], t.src_size[0])
            cuda.memcpy_htod_async(self._transforms_dev, self._transforms_host[: 6 * n], self.stream)
        cuda.memset_d32_async(int(self._count), 0, n, self.stream)
        cuda.memset_d8_async(int(self._removed), 0, n * A, self.stream)
        blocks = (A + _BLOCK - 1) // _BLOCK
        self._decode.prepared_async_call(
            (blocks, n, 1), (_BLOCK, 1, 1), self.stream,
            ptr, A, self._classes, _VARIANTS[cfg.variant], int(self._grid), np.float32(cfg.score_threshold),
            int(self._cand), int(self._count),
        )
        self._rank.prepared_async_call(
            (blocks, n, 1), (_BLOCK, 1, 1), self.stream, int(self._cand), int(self._count), A, int(self._sorted)
        )
        self.decoded.record(self.stream)
        res = self._result.ptr
        boxes, scores, classes, count = res, res + n * K * 16, res + n * K * 20, res + n * K * 24
        self._nms.prepared_async_call(
            (n, 1, 1), (_BLOCK, 1, 1), self.stream,
            int(self._sorted), int(self._count), A, np.float32(cfg.iou_threshold), int(cfg.class_agnostic), K,
            int(self._transforms_dev), int(transforms is not None), int(self._removed), boxes, scores, classes, count,
        )
        self._result.fetch(cuda, n * (K * 6 + 1) * 4, self.stream)

    def result(self) -> dict[str, np.ndarray]:
        """Wait for the queued batch and return its KServe tensors (copies: the buffers are reused)."""
        with self.gpu.active():
            self.done.synchronize()
        self._pending = False
        n, raw = self._n, self._result.host
        if self.config.kind == "classification":
            k = self.config.top_k
            scores = raw[: n * k * 4].view(np.float32).reshape(n, k).copy()
            classes = raw[n * k * 4 : n * k * 8].view(np.int32).reshape(n, k).copy()
            out = {"scores": scores, "classes": classes}
            if self.config.labels is not None:
                out["labels"] = label_tensor(classes, self.labels)
            return out
        K = self.config.max_detections
        return {
            "boxes": raw[: n * K * 16].view(np.float32).reshape(n, K, 4).copy(),
            "scores": raw[n * K * 16 : n * K * 20].view(np.float32).reshape(n, K).copy(),
            "classes": raw[n * K * 20 : n * K * 24].view(np.int32).reshape(n, K).copy(),
            "count": raw[n * K * 24 : n * K * 24 + n * 4].view(np.int32).copy(),
        }

    def run(
        self, outputs: Mapping[str, np.ndarray] | np.ndarray, transforms: Sequence[Transform] | None = None
    ) -> dict[str, np.ndarray]:
        """Upload host outputs, run the kernels and return the tensors (for CPU engines and tests)."""
        if isinstance(outputs, Mapping):
            name = self.config.output
            if name is None and len(outputs) != 1:
                raise InvalidArgument(f"postprocess: the model returned {len(outputs)} outputs; name one in output")
            if name is not None and name not in outputs:
                raise InvalidArgument(f"postprocess: the model returned no output {name!r}")
            outputs = outputs[name] if name is not None else next(iter(outputs.values()))
        self.enqueue(np.asarray(outputs), transforms)
        return self.result()

    def timings(self) -> dict[str, float]:
        """Milliseconds of the last batch: decode (with upload, filter and sort) and NMS/top-k."""
        with self.gpu.active():
            self.done.synchronize()
            return {"decode_ms": elapsed_ms(self.start, self.decoded), "select_ms": elapsed_ms(self.decoded, self.done)}

    def close(self) -> None:
        if self._freed:
            return
        self._freed = True
        with self.gpu.active():
            self.stream.synchronize()
            for alloc in self._allocs:
                alloc.free()
            self._result.free()
            self._pred_host.base.free()
            if hasattr(self, "_transforms_host"):
                self._transforms_host.base.free()
            # Destroyed in their context now (see GpuPreprocessor.close), not by the garbage collector.
            self.start = self.decoded = self.done = None
            self.stream = None
        self.gpu.close()
