"""Sample inputs from files, for ``tegrad bundle create --golden-inputs`` and ``tegrad perf``.

A path is an image (PNG, JPEG, …), a folder of images (its image files in name
order, not recursive), a ``.npy`` file or an ``.npz`` file. Arrays reach the
model's inputs by this key mapping:

1. keys naming the model's inputs (``NAME``, or ``input:NAME`` as in a
   bundle's own ``golden.npz``) feed those inputs; every input must be named;
2. for a model with one input: the key ``x``, else the file's only array, feeds
   it, and other keys (labels such as ``y``) are ignored; a ``.npy`` file is
   one array.

So ``daemon/models/digits/data/heldout.npz`` (keys ``x`` and ``y``) feeds its
``x`` to the digits model's one input.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
TENSOR_SUFFIXES = frozenset({".npy", ".npz"})


class SampleFileError(ValueError):
    """A sample file that cannot feed the model; the message names the file and the fix."""


def split_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """``(images, tensor files)`` named by ``paths``, folders expanded to their image files."""
    images: list[Path] = []
    tensors: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SampleFileError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            images += found
        elif p.suffix.lower() in TENSOR_SUFFIXES:
            tensors.append(p)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            raise SampleFileError(f"{p}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}), .npy, .npz or folder")
    if images and tensors:
        raise SampleFileError("give either images (files or folders) or tensor files (.npy/.npz), not both")
    return images, tensors


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npy`` (key ``""``) or ``.npz`` file."""
    try:
        if path.suffix.lower() == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SampleFileError(f"{path}: not a readable {path.suffix} file ({exc})") from None


def map_arrays(arrays: Mapping[str, np.ndarray], inputs: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """The model's inputs from ``arrays`` by the module's key mapping."""
    named = {k.removeprefix("input:"): v for k, v in arrays.items()}
    if all(name in named for name in inputs):
        return {name: named[name] for name in inputs}
    if len(inputs) == 1:
        if "x" in named:
            return {inputs[0]: named["x"]}
        if len(named) == 1:
            return {inputs[0]: next(iter(named.values()))}
    keys = ", ".join(repr(k) for k in arrays if k) or "one unnamed array"
    raise SampleFileError(f"{where}: holds {keys}, but the model's inputs are {', '.join(inputs)}; key the "
                          "arrays by input name (one model input: 'x' or a single array also works)")


def load_tensors(paths: Sequence[Path], inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's inputs from tensor files; several files are joined along the sample axis."""
    parts = [map_arrays(read_arrays(p), inputs, str(p)) for p in paths]
    out = {}
    for name in inputs:
        arrays = [part[name] for part in parts]
        try:
            out[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        except ValueError as exc:
            raise SampleFileError(f"input {name!r}: the files' arrays do not join ({exc})") from None
    return out


def fit_shape(arr: np.ndarray, dims: Sequence[int | None], name: str, where: str) -> np.ndarray:
    """``arr`` reshaped to ``[N, *dims]`` when its samples hold as many values (``[N,8,8]`` for ``[N,1,8,8]``).

    ``dims`` are the non-batch dimensions, None where free; then the array is taken as it is.
    """
    if arr.ndim == 0:
        raise SampleFileError(f"{where}: input {name!r} needs a leading sample dimension")
    if any(d is None or d < 0 for d in dims) or tuple(arr.shape[1:]) == tuple(dims):
        return arr
    want = int(np.prod(dims)) if dims else 1
    have = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1
    if have != want:
        raise SampleFileError(f"{where}: input {name!r} has samples of shape {list(arr.shape[1:])}, the model "
                              f"takes {list(dims)}")
    return arr.reshape(arr.shape[0], *dims)


def preprocess_images(paths: Sequence[Path], spec) -> np.ndarray:
    """Images decoded with OpenCV and preprocessed by ``spec`` (a calib PreprocessSpec), as one batch."""
    import cv2

    from calib.preprocess import preprocess

    out = []
    for p in paths:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise SampleFileError(f"{p}: OpenCV cannot decode this image")
        out.append(preprocess(image, spec)[0])
    return np.stack(out)
