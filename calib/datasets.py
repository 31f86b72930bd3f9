"""Calibration data sources.

Every source streams *chunks*: ``dict[str, np.ndarray]`` feeds whose arrays
share a leading (batch) dimension. An image folder yields one-sample chunks,
an ``.npy`` file yields slices of a memory map, a user iterable yields whatever
it holds. :func:`batches` re-chunks any of them into feeds of exactly
``batch_size`` samples (the last one may be shorter), so nothing ever holds
more than about one batch in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from calib.preprocess import PreprocessSpec, load_image, preprocess

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

Feed = dict[str, np.ndarray]


class DataSource:
    """Base class: iterable of chunks, with a sample count when known."""

    def iter_chunks(self, input_name: str | None) -> Iterator[Feed]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} has no known length")

    @property
    def num_samples(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    def describe(self) -> dict[str, Any]:
        """Provenance for calibration caches."""
        return {"kind": type(self).__name__}


def _need_name(input_name: str | None, what: str) -> str:
    if not input_name:
        raise ValueError(f"{what} yields bare arrays: pass the model input name (input_name)")
    return input_name


class ImageFolder(DataSource):
    """Images of a folder, in sorted file-name order, preprocessed one at a time."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        spec: PreprocessSpec,
        limit: int | None = None,
        recursive: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a directory")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        self.spec = spec
        pattern = "**/*" if recursive else "*"
        files = sorted(
            (p for p in self.root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not files:
            raise ValueError(f"{self.root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = files[:limit] if limit is not None else files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        tensor, _ = preprocess(load_image(self.files[index]), self.spec)
        return tensor

    def iter_chunks(self, input_name: str | None) -> Iterator[Feed]:
        name = _need_name(input_name, "an image folder")
        for i in range(len(self.files)):
            yield {name: self.load(i)[None]}

    def describe(self) -> dict[str, Any]:
        return {"kind": "images", "path": str(self.root), "count": len(self.files)}


class NumpyFiles(DataSource):
    """``.npy`` arrays (batch dimension first) or ``.npz`` archives keyed by input name.

    ``.npy`` files are memory-mapped, so only the slices in flight are read.
    """

    def __init__(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], limit: int | None = None) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no .npy/.npz files given")
        for p in self.paths:
            if p.suffix.lower() not in (".npy", ".npz"):
                raise ValueError(f"{p}: expected a .npy or .npz file")
            if not p.is_file():
                raise ValueError(f"{p}: no such file")
        self.limit = limit
        self._count: int | None = None

    def _arrays(self, path: Path) -> dict[str | None, np.ndarray]:
        if path.suffix.lower() == ".npy":
            return {None: np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            # An npz member is read whole on access; that is one file's worth.
            return {k: z[k] for k in z.files}

    def __len__(self) -> int:
        if self._count is None:
            total = 0
            for p in self.paths:
                if p.suffix.lower() == ".npy":
                    total += int(np.load(p, mmap_mode="r", allow_pickle=False).shape[0])
                else:
                    with np.load(p, allow_pickle=False) as z:
                        total += _leading_dim({k: z[k] for k in z.files}, str(p))
            self._count = total
        return self._count if self.limit is None else min(self._count, self.limit)

    def iter_chunks(self, input_name: str | None) -> Iterator[Feed]:
        remaining = self.limit
        chunk = 64
        for p in self.paths:
            arrays = self._arrays(p)
            if None in arrays:
                feed_src = {_need_name(input_name, f"{p}"): arrays[None]}
            else:
                feed_src = {str(k): v for k, v in arrays.items()}
            n = _leading_dim(feed_src, str(p))
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                if remaining is not None:
                    stop = min(stop, start + remaining)
                yield {k: np.ascontiguousarray(v[start:stop]) for k, v in feed_src.items()}
                if remaining is not None:
                    remaining -= stop - start
                    if remaining <= 0:
                        return

    def describe(self) -> dict[str, Any]:
        return {"kind": "numpy", "paths": [str(p) for p in self.paths], "count": len(self)}


def _leading_dim(feed: Mapping[str, np.ndarray], where: str) -> int:
    dims = {k: (v.shape[0] if v.ndim else None) for k, v in feed.items()}
    if not dims or any(d is None for d in dims.values()):
        raise ValueError(f"{where}: every array needs a leading batch dimension, got shapes "
                         f"{ {k: v.shape for k, v in feed.items()} }")
    if len(set(dims.values())) != 1:
        raise ValueError(f"{where}: arrays disagree on the batch dimension: {dims}")
    return next(iter(dims.values()))  # type: ignore[return-value]


class IterableSource(DataSource):
    """Any Python iterable of arrays or ``{input name: array}`` dicts.

    With ``batched=False`` (default) each item is one sample without batch
    dimension; with ``batched=True`` each item already has one.
    """

    def __init__(self, items: Iterable[Any], batched: bool = False, limit: int | None = None) -> None:
        self.items = items
        self.batched = batched
        self.limit = limit

    def __len__(self) -> int:
        if self.batched or not hasattr(self.items, "__len__"):
            raise TypeError("length unknown")
        n = len(self.items)  # type: ignore[arg-type]
        return n if self.limit is None else min(n, self.limit)

    def iter_chunks(self, input_name: str | None) -> Iterator[Feed]:
        remaining = self.limit
        for item in self.items:
            if isinstance(item, Mapping):
                feed = {str(k): np.asarray(v) for k, v in item.items()}
            else:
                feed = {_need_name(input_name, "this iterable"): np.asarray(item)}
            if not self.batched:
                feed = {k: v[None] for k, v in feed.items()}
            n = _leading_dim(feed, "calibration item")
            if remaining is not None:
                if n > remaining:
                    feed = {k: v[:remaining] for k, v in feed.items()}
                    n = remaining
                remaining -= n
            if n:
                yield feed
            if remaining is not None and remaining <= 0:
                return

    def describe(self) -> dict[str, Any]:
        return {"kind": "iterable"}


SourceLike = Union[DataSource, str, "os.PathLike[str]", Iterable[Any]]


def is_capture(path: Path) -> bool:
    """A folder of the daemon's field capture (``capture.json`` beside ``<seq>.npz`` samples)."""
    return path.is_dir() and (path / "capture.json").is_file()


def as_source(
    source: SourceLike,
    spec: PreprocessSpec | None = None,
    limit: int | None = None,
) -> DataSource:
    """Turn a path (image folder, .npy/.npz file), a DataSource or an iterable into a DataSource."""
    if isinstance(source, DataSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if is_capture(p):
            # The daemon's field capture (daemon/monitor/capture.py): preprocessed tensors, one .npz each.
            files = sorted(p.glob("[0-9]*.npz"))
            if not files:
                raise ValueError(f"{p}: the capture directory holds no samples yet")
            return NumpyFiles(files, limit=limit)
        if p.is_dir():
            if spec is None:
                raise ValueError(f"{p}: an image folder needs a preprocessing spec")
            return ImageFolder(p, spec, limit=limit)
        if p.suffix.lower() in (".npy", ".npz"):
            return NumpyFiles(p, limit=limit)
        raise ValueError(f"{p}: expected an image folder or a .npy/.npz file")
    if isinstance(source, np.ndarray):
        # A bare array is a stack of samples, batch dimension first.
        return IterableSource([source], batched=True, limit=limit)
    if isinstance(source, Iterable):
        return IterableSource(source, limit=limit)
    raise ValueError(f"cannot use {type(source).__name__} as calibration data")


def batches(
    source: SourceLike,
    input_name: str | None = None,
    batch_size: int = 1,
    spec: PreprocessSpec | None = None,
    limit: int | None = None,
) -> Iterator[Feed]:
    """Yield feeds of exactly ``batch_size`` samples (the last may be smaller)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    src = as_source(source, spec=spec, limit=limit)
    pending: list[Feed] = []
    count = 0
    keys: list[str] | None = None
    for chunk in src.iter_chunks(input_name):
        if keys is None:
            keys = sorted(chunk)
        elif sorted(chunk) != keys:
            raise ValueError(f"calibration items disagree on input names: {keys} vs {sorted(chunk)}")
        n = next(iter(chunk.values())).shape[0]
        start = 0
        while start < n:
            take = min(batch_size - count, n - start)
            if start == 0 and take == n:
                part = chunk
            else:
                part = {k: v[start : start + take] for k, v in chunk.items()}
            pending.append(part)
            count += take
            start += take
            if count == batch_size:
                yield _concat(pending)
                pending, count = [], 0
    if pending:
        yield _concat(pending)


def _concat(parts: list[Feed]) -> Feed:
    if len(parts) == 1:
        return {k: np.ascontiguousarray(v) for k, v in parts[0].items()}
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
