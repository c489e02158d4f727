"""Image pixels as a site reads them: size checks before decoding, and conversion to square uint8 arrays.

Every image becomes uint8 resized to ``image_size`` x ``image_size`` (PIL, bilinear, aspect ratio not kept):
``(S, S)`` when it is grayscale (or RGB with equal channels, as X-rays are often saved), ``(S, S, 3)`` when it has
colour (fundus photographs, dermoscopy, histology). An image's size is read from its header and checked against
``data.max-pixels`` before any pixel is decoded (Pillow opens lazily). Wide data (16-bit PNG, DICOM) is converted
in chunks of ``_CHUNK`` pixels, so the float arithmetic never holds more than a few MB however large the frame.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fedtl.site_config import DEFAULT_MAX_PIXELS

_CHUNK = 1 << 20  # pixels converted at a time (DICOM LUTs, min-max stretching): bounds the float working set


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than ``data.max-pixels``; it is not decoded."""


def check_pixels(width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    """Raise :class:`ImageTooLarge` when ``frames`` frames of ``width`` x ``height`` exceed ``max_pixels``."""
    width, height, frames = int(width), int(height), int(frames)
    if width <= 0 or height <= 0 or frames <= 0:
        raise ValueError(f"image header declares {width}x{height} pixels ({frames} frame(s)): no image")
    pixels = width * height * frames
    if pixels > max_pixels:
        what = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLarge(f"image is {what} = {pixels / 1e6:.1f} Mpx, above data.max-pixels = "
                            f"{max_pixels / 1e6:.1f} Mpx; not decoded")


def read_image_file(path: Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PNG / JPEG (or other Pillow-readable) image as ``(S, S)`` uint8 grayscale or ``(S, S, 3)`` RGB when it has
    colour (:func:`_pixels`); its size is checked first."""
    with warnings.catch_warnings():
        # Pillow warns of a possible bomb above its own 89 Mpx while reading the header; the size is
        # checked against data.max-pixels (at most Pillow's hard limit) right below, before decoding.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)  # lazy: reads the header only
    with img:
        check_pixels(*img.size, max_pixels)
        img.load()  # decode now: truncated or corrupt data fails here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):  # 16/32-bit gray: stretch its own range
            return _to_square_uint8(_minmax_uint8(np.asarray(img)), image_size)
        return _pixels(img, image_size)


def _map_chunks(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` applied elementwise to ``arr`` a chunk at a time, into a uint8 array of ``arr``'s shape."""
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for start in range(0, flat.size, _CHUNK):
        out[start:start + _CHUNK] = fn(flat[start:start + _CHUNK])
    return out.reshape(arr.shape)


def _scale_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[lo, hi]`` → 0-255; NaN maps to 0, values outside the range are clipped."""
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    scaled = (np.asarray(arr, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


def _minmax_uint8(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Stretch ``fn(arr)`` (default: ``arr``) from its own finite min-max to 0-255, a chunk at a time."""
    fn = fn or (lambda c: c)
    lo, hi = np.inf, -np.inf
    flat = arr.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        values = np.asarray(fn(flat[start:start + _CHUNK]))
        if values.dtype.kind == "f":
            values = values[np.isfinite(values)]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if lo > hi:
        raise ValueError("no finite pixel values")
    return _map_chunks(arr, lambda c: _scale_uint8(fn(c), lo, hi))


def _to_square_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` uint8 → ``(size, size)`` grayscale or ``(size, size, 3)`` RGB (:func:`_pixels`)."""
    if arr.dtype != np.uint8:
        raise ValueError(f"image has dtype {arr.dtype}; expected uint8")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    elif arr.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise ValueError(f"image has shape {arr.shape}; expected (H, W) or (H, W, C)")
    return _pixels(img, size)


def stack_images(arrays: list[np.ndarray], size: int) -> np.ndarray:
    """``(S, S)`` / ``(S, S, 3)`` images as one array: ``(N, S, S)``, or ``(N, S, S, 3)`` as soon as one has colour
    (a gray image's channel repeated, as the backbone's preprocessing would)."""
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    return np.stack(arrays) if arrays else np.zeros((0, size, size), np.uint8)


_GRAY_MODES = ("1", "L", "LA", "La")


def _pixels(img: Image.Image, size: int) -> np.ndarray:
    """A decoded Pillow image resized to ``size`` x ``size``: ``(S, S)`` uint8 when it is grayscale or RGB with three
    equal channels (one array, the same features: the backbone's preprocessing repeats a gray channel), else ``(S, S,
    3)`` RGB — colour is information (fundus, dermoscopy, histology), not something to average away. Alpha is
    dropped."""
    img = img.convert("L" if img.mode in _GRAY_MODES else "RGB") if img.mode not in ("L", "RGB") else img
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return np.ascontiguousarray(arr[..., 0])
    return arr
