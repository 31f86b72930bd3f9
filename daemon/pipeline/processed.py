"""A model's declared pre- and post-processing around its engine, run in the instance slots.

Decoding happens before a request is queued (``admit``: one thread-pool task per image), so a
corrupt image fails only its own request, never a batch it would have joined, and JPEG
decoding of the next requests runs while the slots compute. Every image is checked from its
header before any is decoded, and the request first takes what its images will hold from the
daemon's decode budget (:mod:`daemon.processing.budget`), waiting in line when it is spent.
Resize/normalise, inference and postprocessing then run in the slot's thread (or on its CUDA
stream): with N slots the preprocessing of one batch overlaps the inference and postprocessing
of others.

On the GPU with an engine that exposes a device-side slot (TensorRT's ``infer_device``), images
stay on the device: the preprocessing kernel writes the engine's input buffer, the engine and the
postprocessing kernels read the previous stage's buffer in place, all queued on the slot's one
stream, and the host waits once, for the final tensors. Stage boundaries are CUDA events, which
also time the stages. Other engines (ONNX Runtime) round-trip through host tensors.

Raw frames from a registered shared-memory region, on an integrated GPU (Jetson, detected from
the device's INTEGRATED and CAN_MAP_HOST_MEMORY attributes), are not read by the host at all:
``in_place_inputs`` tells the server to leave them in the region, ``admit`` turns them into
:class:`~daemon.processing.images.FrameInRegion` items, and the kernel reads them through the
region's GPU mapping (:func:`daemon.processing.gpu_shm.enqueue_frames`). Elsewhere (CPU,
discrete GPUs, encoded images, tensors) the server reads them with one copy.

A model with ``[preprocess]`` accepts either the images (``preprocess.input``) or its own
input tensor, already preprocessed, in each request: both are optional inputs in its
metadata and exactly one must be sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path

import numpy as np

from daemon.config import ModelConfig
from daemon.engines.availability import cuda_unavailable
from daemon.errors import ConfigError, InvalidArgument
from daemon.processing.budget import DecodeBudget, daemon_budget
from daemon.processing.cpu import CpuPostprocessor, CpuPreprocessor
from daemon.processing.images import BatchDecoder, CheckedImage, FrameInRegion, check_batch, frames_batch
from daemon.processing.spec import bind_input, bind_output
from daemon.telemetry.metrics import IMAGES_CORRUPT
from daemon.tensor_spec import TensorSpec

log = logging.getLogger("tegrad.images")


def processing_device(config: ModelConfig) -> str:
    if config.processing_device == "cpu":
        return "cpu"
    why = cuda_unavailable()
    if config.processing_device == "gpu":
        if why:
            raise ConfigError(f"model {config.name}: processing_device = \"gpu\" {why}")
        return "gpu"
    return "gpu" if config.backend == "tensorrt" and why is None else "cpu"


def _in_region(images: list) -> bool:
    return any(isinstance(image, FrameInRegion) for image in images)


def _object_array(items: list) -> np.ndarray:
    # Element-wise: np.array() would try to stack equally sized images into one block.
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


class ProcessedEngine:
    """The Engine protocol (what the scheduler runs) with pre/post-processing around an engine."""

    def __init__(self, engine, config: ModelConfig, model_dir: Path, pool: Executor,
                 budget: DecodeBudget | None = None) -> None:
        self._engine = engine
        self._name = config.name
        self._budget = budget or daemon_budget()
        self.backend, self.precision, self.engine_id = engine.backend, engine.precision, engine.engine_id
        self._pre, self._post, self._pool = config.preprocess, config.postprocess, pool
        try:
            self._model_input = bind_input(self._pre, engine.inputs) if self._pre else None
            self._model_output = bind_output(self._post, engine.outputs) if self._post else None
            labels = self._post.load_labels(model_dir) if self._post else ()
        except ValueError as exc:
            raise ConfigError(f"{model_dir / 'config.toml'}: {exc}") from None
        batch = -1 if config.max_batch > 0 else 1
        self.inputs: list[TensorSpec] = list(engine.inputs)
        if self._pre:
            self.inputs = [replace(t, optional=True) if t.name == self._model_input.name else t for t in self.inputs]
            self.inputs.insert(0, replace(self._pre.client_input(batch), optional=True))
        self.outputs = self._post.output_specs(engine.outputs, batch) if self._post else list(engine.outputs)
        self.device = processing_device(config)
        # Only the preprocessed tensor can be written in place, and the GPU kernels read FP32 outputs.
        self._on_device = (self.device == "gpu" and self._pre is not None and hasattr(engine, "infer_device")
                           and len(engine.inputs) == 1
                           and (self._model_output is None or self._model_output.datatype == "FP32"))
        slots = getattr(engine, "slots", config.instances)
        input_hw = self._pre.to_spec().size if self._pre else None
        try:
            self._pres = [self._preprocessor(config, slot) for slot in range(slots)]
            self._posts = [self._postprocessor(config, labels, input_hw, slot) for slot in range(slots)]
        except ValueError as exc:
            raise ConfigError(f"{model_dir / 'config.toml'}: {exc}") from None
        self._stages = [(0, 0, 0)] * slots
        self.in_place_inputs = frozenset({self._pre.input}) if self._reads_regions_in_place() else frozenset()

    def _reads_regions_in_place(self) -> bool:
        """Zero-copy needs raw frames, GPU preprocessing and CPU/GPU shared memory (integrated)."""
        if self._pre is None or self._pre.format != "raw" or self.device != "gpu":
            return False
        return all(getattr(p, "gpu", None) is not None and p.gpu.integrated for p in self._pres)

    def _stream(self, slot: int):
        # The engine's own stream: stream order alone keeps each stage after the previous one
        # and the next request's preprocessing after this one's inference, with no host waits.
        return self._engine.stream(slot) if self._on_device else None

    def _preprocessor(self, config: ModelConfig, slot: int):
        if self._pre is None:
            return None
        if self.device == "gpu":
            from daemon.processing.gpu import GpuPreprocessor

            return GpuPreprocessor(self._pre, max(config.max_batch, 1), stream=self._stream(slot))
        return CpuPreprocessor(self._pre)

    def _postprocessor(self, config: ModelConfig, labels: tuple[str, ...], input_hw, slot: int):
        if self._post is None:
            return None
        if self.device == "gpu" and self._post.kind != "raw":
            from daemon.processing.gpu_post import GpuPostprocessor

            # Per sample: preprocessing always hands the engine a batch, so dim 0 is the batch.
            return GpuPostprocessor(self._post, self._model_output.shape[1:], max(config.max_batch, 1),
                                    labels=labels, input_hw=input_hw, stream=self._stream(slot))
        return CpuPostprocessor(self._post, labels, input_hw)

    @property
    def slots(self) -> int:
        return len(self._stages)

    async def admit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check which form the request took; decode its images in the pool (before queueing)."""
        if self._pre is None:
            return inputs
        name, tensor = self._pre.input, self._model_input.name
        if (name in inputs) == (tensor in inputs):
            both = "not both" if name in inputs else "neither was sent"
            raise InvalidArgument(f"send either {name!r} (images) or {tensor!r} (the preprocessed tensor): {both}")
        if name not in inputs:
            return inputs
        batch = inputs[name]
        if self._pre.format == "raw":
            images = frames_batch(batch, self._pre, in_place=bool(self.in_place_inputs))
        else:
            items = batch.reshape(-1) if batch.ndim == 2 and batch.shape[1] == 1 else batch
            if items.ndim != 1 or items.size == 0:
                raise InvalidArgument(f"input {name!r}: encoded images come as BYTES [N] or [N, 1] with N >= 1, "
                                      f"got {list(batch.shape)}")
            images = await self._decode(check_batch(list(items), self._pre))
        return {**inputs, name: _object_array(list(images))}

    async def _decode(self, checked: list[CheckedImage]) -> list[np.ndarray]:
        """Decode in the pool once the request's share of the decode budget is granted."""
        budget = self._budget
        largest = max(checked, key=lambda c: c.nbytes)
        await budget.acquire(sum(c.nbytes for c in checked), f"this request of {len(checked)} image(s) (the largest, "
                             f"batch index {largest.index}, is {largest.header.describe()})")
        corrupt = IMAGES_CORRUPT.labels(self._name)

        def on_image(item: CheckedImage, decoded) -> None:
            budget.hold(decoded.image, item.nbytes)
            if decoded.warning is not None:
                corrupt.inc()
                log.debug("%s: %s decoded despite corrupt data: %s", self._name, item.where, decoded.warning)

        decoder = BatchDecoder(on_image, lambda item: budget.release(item.nbytes))
        loop = asyncio.get_running_loop()
        jobs = asyncio.gather(*(loop.run_in_executor(self._pool, decoder, item) for item in checked))
        try:
            # Shielded: a cancelled wait must not cancel pool jobs before they run, or their budget
            # share would never come back; stopped, they skip their image and give it back.
            return await asyncio.shield(jobs)
        except BaseException:
            decoder.stop()
            raise

    def _done_with_images(self, images) -> None:
        # Preprocessed: what the decoded images held goes back to the budget now rather than when
        # the request's last reference to them goes.
        for image in images:
            self._budget.release_image(image)

    def infer(self, feeds: dict[str, np.ndarray], slot: int = 0) -> dict[str, np.ndarray]:
        if self._on_device and self._pre.input in feeds:
            return self._infer_on_device(feeds, slot)
        t0 = time.perf_counter_ns()
        transforms = None
        if self._pre is not None and self._pre.input in feeds:
            images = list(feeds[self._pre.input])
            if _in_region(images):
                from daemon.processing.gpu_shm import run_frames

                tensor, transforms = run_frames(self._pres[slot], images)
            else:
                tensor, transforms = self._pres[slot].run(images)
            self._done_with_images(feeds[self._pre.input])
            feeds = {k: v for k, v in feeds.items() if k != self._pre.input}
            feeds[self._model_input.name] = tensor
        t1 = time.perf_counter_ns()
        outputs = self._engine.infer(feeds, slot)
        t2 = time.perf_counter_ns()
        if self._post is not None:
            outputs = self._posts[slot].run(outputs, transforms)
        t3 = time.perf_counter_ns()
        pre_ns, post_ns = t1 - t0, t3 - t2
        if self.device == "gpu":  # the kernels' own time, from CUDA events
            if self._pres[slot] is not None and transforms is not None:
                pre_ns = int(sum(self._pres[slot].timings().values()) * 1e6)
            if self._posts[slot] is not None and hasattr(self._posts[slot], "timings"):
                post_ns = int(sum(self._posts[slot].timings().values()) * 1e6)
        self._stages[slot] = (pre_ns, t2 - t1, post_ns)
        return outputs

    def _infer_on_device(self, feeds: dict[str, np.ndarray], slot: int) -> dict[str, np.ndarray]:
        pre, post, engine = self._pres[slot], self._posts[slot], self._engine
        name = self._model_input.name
        images = list(feeds[self._pre.input])
        if _in_region(images):
            from daemon.processing.gpu_shm import enqueue_frames

            tensor, transforms = enqueue_frames(pre, images, out_ptr=engine.input_buffer(slot, name))
        else:
            tensor, transforms = pre.enqueue(images, out_ptr=engine.input_buffer(slot, name))
        outputs = engine.infer_device(slot, {name: tensor.shape}, wait_for=pre.done)
        self._done_with_images(feeds[self._pre.input])
        if hasattr(post, "enqueue"):
            post.enqueue(outputs[self._model_output.name], transforms, wait_for=engine.done_event(slot))
            result = post.result()
            infer_ms, post_ns = engine.infer_ms(slot), int(sum(post.timings().values()) * 1e6)
        else:
            infer_ms = engine.infer_ms(slot)  # waits for the engine, so the clock below times the copy only
            t0 = time.perf_counter_ns()
            result = self._to_host(slot, outputs)
            if post is not None:
                result = post.run(result, transforms)
            post_ns = time.perf_counter_ns() - t0
        self._stages[slot] = (int(sum(pre.timings().values()) * 1e6), int(infer_ms * 1e6), post_ns)
        return result

    def _to_host(self, slot: int, outputs: dict) -> dict[str, np.ndarray]:
        """The engine's device outputs as host arrays (postprocess 'raw' or none)."""
        stream = self._engine.stream(slot)
        with self._pres[slot].gpu.active() as cuda:
            host = {k: np.empty(t.shape, t.dtype) for k, t in outputs.items()}
            for k, t in outputs.items():
                # On the slot's stream, not the default one, which would wait for every other slot.
                # Pageable memory makes the copy synchronous, but these arrays are the results.
                cuda.memcpy_dtoh_async(host[k], t.ptr, stream)
            stream.synchronize()
        return host

    def stage_ns(self, slot: int) -> tuple[int, int, int]:
        """(preprocess, infer, postprocess) nanoseconds of the slot's last execution."""
        return self._stages[slot]

    def close(self) -> None:
        for p in (*self._pres, *self._posts):
            if p is not None and hasattr(p, "close"):
                p.close()
        self._engine.close()
