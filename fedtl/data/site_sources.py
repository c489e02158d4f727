"""A data site's own images: a MedMNIST npz, a folder of PNG/JPEG files, or DICOM files.

Folder and DICOM sites list their images in a CSV with header ``file,label`` (paths relative to
the data folder; labels are integers, or class names when ``data.classes`` lists them in class-index
order); ``data.labels-column`` names another label column (``file,abnormal,site``: ``"abnormal"``), and
other columns are ignored. Every image becomes uint8 resized to ``image_size`` x ``image_size`` (PIL,
bilinear, aspect ratio not kept): ``(S, S)`` when it is grayscale (or RGB with equal channels, as X-rays are
often saved), ``(S, S, 3)`` when it has colour (fundus photographs, dermoscopy, histology), so a site yields one
:class:`~fedtl.data.sources.ImageSet` — of 3 channels as soon as one of its images has colour (a grayscale image
among them is its channel repeated, as the backbone's preprocessing would repeat it).

One bad file never stops a site: a missing, corrupt, undecodable or oversized image (or a CSV row
with a bad label) is skipped and reported as a :class:`Problem`. :class:`~fedtl.errors.DataError` is raised
only when the CSV is missing or malformed, or when no image at all could be read.

DICOM pixels go through the modality LUT (rescale slope / intercept), then the VOI LUT or window
(center / width); the window's output range is mapped to 0-255. Without a VOI, data wider than
8 bits is scaled from its own min-max. MONOCHROME1 is inverted so that bright is always dense
tissue, and a multi-frame file contributes its first frame.

Decompression bombs: an image's size is read from its header and checked against ``data.max-pixels``
before any pixel is decoded (Pillow opens lazily; a DICOM header is parsed without its Pixel Data,
and a deflate-compressed DICOM is inflated only as far as its header, then only to the size that
header declares). Accepted DICOM frames are converted in chunks of ``_CHUNK`` pixels, so the float
arithmetic of the LUTs never holds more than a few MB however large the frame.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from fedtl.data.sources import ImageSet, load_medmnist
from fedtl.errors import DataError
from fedtl.site_config import DEFAULT_MAX_PIXELS, SiteDataConfig

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224  # folder / DICOM images are brought to this square size unless data.image-size says
_LOGGED_PROBLEMS = 20  # the warning names this many skipped files; SiteImages.problems holds them all
_CHUNK = 1 << 20  # pixels converted at a time (DICOM LUTs, min-max stretching): bounds the float working set
_DEFLATED_HEADER_LIMIT = 16 << 20  # inflated bytes searched for a deflated DICOM's header before giving up
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float / Double Float Pixel Data


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than ``data.max-pixels``; it is not decoded."""


class Problem(NamedTuple):
    """A file (or CSV row) that was skipped, and why."""

    file: str
    reason: str


@dataclass(frozen=True, eq=False)
class SiteImages:
    """What a site could read: the images, the names of its classes and every skipped file."""

    images: ImageSet  # (N, S, S) or, when any image has colour, (N, S, S, 3) uint8; labels (N,) int64
    class_names: tuple[str, ...]  # index -> name ("0", "1", … when the labels are plain integers)
    problems: tuple[Problem, ...] = ()
    listed: int = 0  # entries considered (CSV rows, or images in the npz split)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = self.images.class_counts(self.num_classes)
        return dict(zip(self.class_names, counts))


def load_site_data(cfg: SiteDataConfig, *, allow_empty: bool = False) -> SiteImages:
    """Read a site's images as its config describes; ``allow_empty`` returns a site with none read."""
    if cfg.format == "medmnist":
        result = _load_medmnist_split(cfg)
    else:
        folder, labels = Path(cfg.path), cfg.labels
        if labels is None:
            raise DataError(f"data.format {cfg.format!r} needs `data.labels`, a CSV with header `file,label`.")
        reader = read_dicom_image if cfg.format == "dicom" else read_image_file
        result = load_labelled_files(folder, Path(labels), reader, cfg.image_size or DEFAULT_IMAGE_SIZE, cfg.classes,
                                     max_pixels=cfg.max_pixels, label_column=cfg.labels_column)
    if len(result.images) == 0 and not allow_empty:
        shown = "; ".join(f"{p.file}: {p.reason}" for p in result.problems[:5])
        more = f" (and {len(result.problems) - 5} more)" if len(result.problems) > 5 else ""
        raise DataError(f"No image could be read from {cfg.path} ({result.listed} listed): {shown}{more}. "
                        "Fix those files or the labels CSV.")
    return result


def _load_medmnist_split(cfg: SiteDataConfig) -> SiteImages:
    src = load_medmnist(cfg.path, require=(cfg.split,))
    part = src.split(cfg.split)
    num_classes = src.num_classes
    if cfg.classes:
        if len(cfg.classes) < num_classes:
            raise DataError(f"{cfg.path} holds {num_classes} classes but `data.classes` names only "
                            f"{len(cfg.classes)} ({', '.join(cfg.classes)}); name every class in index order.")
        num_classes = len(cfg.classes)
    native = part.images.ndim in (3, 4) and part.images.shape[1] == part.images.shape[2]
    if native and cfg.image_size in (0, part.images.shape[1]):
        images = part.images.copy()  # already square (grayscale or RGB): the backbone's preprocessing resizes
    else:
        size = cfg.image_size or DEFAULT_IMAGE_SIZE
        images = stack_images([_to_square_uint8(img, size) for img in part.images], size)
    names = cfg.classes or tuple(str(i) for i in range(num_classes))
    return SiteImages(ImageSet(images, part.labels.copy(), part.name), names, (), len(part))


# ---- folder and DICOM sites: a CSV lists the files ---------------------------------------------------

Reader = Callable[..., np.ndarray]  # reader(path, image_size, max_pixels=...) -> (S, S) or (S, S, 3) uint8


class LabelRow(NamedTuple):
    """One data row of a labels CSV: the file, its class index, the line, and why it is unusable (or None)."""

    file: str
    label: int
    line: int
    problem: str | None = None


def load_labelled_files(folder: Path, labels_csv: Path, reader: Reader, image_size: int,
                        classes: tuple[str, ...] = (), *, max_pixels: int = DEFAULT_MAX_PIXELS,
                        label_column: str = "label") -> SiteImages:
    """Read every file the CSV lists with ``reader(path, image_size, max_pixels=…)``; skip and report the bad
    ones, in CSV order."""
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist or is not a folder; set `data.path` to the folder "
                        "the labels CSV's paths are relative to.")
    rows = read_labels_csv(labels_csv, classes, label_column)
    images = np.empty((len(rows), image_size, image_size), np.uint8)  # (…, 3) from the first colour image on
    labels = np.empty(len(rows), np.int64)
    problems: list[Problem] = []
    kept = 0
    for row in rows:
        path = folder / row.file
        if row.problem is not None:
            problems.append(Problem(row.file, row.problem))
            continue
        if not path.is_file():
            problems.append(Problem(row.file, "file does not exist" if not path.exists() else "not a regular file"))
            continue
        try:
            image = reader(path, image_size, max_pixels=max_pixels)
            if image.ndim == 3 and images.ndim == 3:  # the first colour image: every image gets 3 channels
                images = np.repeat(images[..., None], 3, axis=-1)
            images[kept] = image[..., None] if image.ndim < images.ndim - 1 else image
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; one bad file must not stop the site
            problems.append(Problem(row.file, _reason(exc)))
            continue
        labels[kept] = row.label
        kept += 1
    if problems:
        shown = ", ".join(f"{p.file} ({p.reason})" for p in problems[:_LOGGED_PROBLEMS])
        more = f", and {len(problems) - _LOGGED_PROBLEMS} more" if len(problems) > _LOGGED_PROBLEMS else ""
        log.warning("Skipped %d of %d entries listed in %s: %s%s", len(problems), len(rows), labels_csv, shown, more)
    num_classes = len(classes) if classes else int(labels[:kept].max(initial=-1)) + 1
    names = classes or tuple(str(i) for i in range(num_classes))
    return SiteImages(ImageSet(images[:kept].copy(), labels[:kept].copy(), labels_csv.name), names,
                      tuple(problems), len(rows))


def read_labels_csv(path: Path, classes: tuple[str, ...] = (), label_column: str = "label") -> list[LabelRow]:
    """Every data row of a CSV with columns ``file`` and ``label_column`` (``label`` by default; others are
    ignored); rows with a bad label, path or a repeat carry a problem."""
    if not path.is_file():
        raise DataError(f"Labels file {path} does not exist; set `data.labels` to a CSV with header `file,label`.")
    index = {name: i for i, name in enumerate(classes)}
    rows: list[LabelRow] = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, skipinitialspace=True)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("file", label_column) if c not in header]
            if missing:
                hint = "" if label_column != "label" else \
                    "; if another column holds the labels, name it with `data.labels-column` in site.toml"
                raise DataError(f"Labels file {path} has no {' and no '.join(f'`{c}`' for c in missing)} column; "
                                f"its header is {','.join(header) or '(empty)'!r}, expected `file,{label_column}`{hint}.")
            reader.fieldnames = header
            for record in reader:
                line = reader.line_num
                name, text = (record.get("file") or "").strip(), (record.get(label_column) or "").strip()
                label = _parse_label(text, classes, index)
                problem = None
                if not name:
                    name, problem = f"{path.name}:{line}", "row has no file name"
                elif os.path.isabs(name) or Path(os.path.normpath(name)).parts[:1] == ("..",):
                    problem = f"path must be relative to the data folder and stay inside it (line {line})"
                elif name in seen:
                    problem = f"listed again on line {line} (first on line {seen[name]}); the first is used"
                elif isinstance(label, str):
                    problem = f"{label} (line {line})"
                else:
                    seen[name] = line
                rows.append(LabelRow(name, label if isinstance(label, int) else -1, line, problem))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"Labels file {path} is not a readable UTF-8 CSV ({exc}).") from exc
    if not rows:
        raise DataError(f"Labels file {path} lists no files; add one `file,label` row per image.")
    return rows


def _parse_label(text: str, classes: tuple[str, ...], index: dict[str, int]) -> int | str:
    """The class index, or a reason the label is unusable."""
    if text in index:
        return index[text]
    try:
        value = int(text)
    except ValueError:
        if classes:
            return f"label {text!r} is not one of data.classes ({', '.join(classes)})"
        return f"label {text!r} is not an integer; list class names in `data.classes` to use names"
    if value < 0 or (classes and value >= len(classes)):
        allowed = f"0..{len(classes) - 1}" if classes else ">= 0"
        return f"label {value} is out of range (allowed: {allowed})"
    return value


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- single files ---------------------------------------------------------------------------------------

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


def read_dicom_image(path: Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A DICOM file's first frame as ``(S, S)`` uint8 grayscale, ``(S, S, 3)`` for a colour one (see the module notes)."""
    return _to_square_uint8(dicom_to_uint8(read_dicom(path, max_pixels)), image_size)


def read_dicom(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """A DICOM dataset whose image size was checked from its header before its Pixel Data was read."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError as exc:
        raise ValueError("not a DICOM file (no 128-byte preamble with the 'DICM' prefix)") from exc
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _read_deflated_dicom(path, meta, max_pixels)
    _check_dicom_size(pydicom.dcmread(path, stop_before_pixels=True), max_pixels, header_only=True)
    ds = pydicom.dcmread(path)
    _check_dicom_size(ds, max_pixels)  # the file read in full says the same
    return ds


def _check_dicom_size(ds: Dataset, max_pixels: int, header_only: bool = False) -> int:
    """Check the frame size the header declares; returns the bytes of native (uncompressed) Pixel Data."""
    from pydicom.uid import UID

    if not header_only and not any(tag in ds for tag in _PIXEL_DATA_TAGS):
        raise ValueError("no Pixel Data element: not an image")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    compressed = syntax is not None and UID(syntax).is_compressed
    # compressed: only the first frame is decoded; native: every frame's bytes are read from the file
    check_pixels(cols, rows, max_pixels, 1 if compressed else frames)
    return rows * cols * frames * samples * -(-bits // 8)


def _read_deflated_dicom(path: Path, meta, max_pixels: int) -> Dataset:
    """Deflated Explicit VR Little Endian: inflate the header, check it, then inflate no more than it declares."""
    from pydicom.filereader import read_dataset

    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise ValueError("deflated DICOM without a File Meta Information Group Length (0002,0000)")
    with open(path, "rb") as fh:
        fh.seek(128 + 4 + 12 + int(group_length))  # preamble, 'DICM', (0002,0000) itself, the rest of group 2
        stream = _BoundedInflate(fh)
        limit = 64 << 10
        while True:
            reached: list[int] = []

            def at_pixels(tag, vr, length) -> bool:
                if tag in _PIXEL_DATA_TAGS:
                    reached.append(tag)
                    return True
                return False

            stream.fill(limit)
            header = read_dataset(io.BytesIO(bytes(stream.out)), False, True, stop_when=at_pixels)
            if reached or stream.ended:
                break
            if limit >= _DEFLATED_HEADER_LIMIT:
                raise ValueError(f"deflated DICOM header is larger than {_DEFLATED_HEADER_LIMIT >> 20} MB inflated")
            limit *= 2
        if not reached:
            raise ValueError("no Pixel Data element: not an image")
        header.file_meta = meta
        declared = len(stream.out) + _check_dicom_size(header, max_pixels, header_only=True) + (1 << 20)  # + 1 MB of trailing elements
        stream.fill(declared + 1)
        if len(stream.out) > declared:
            raise ValueError(f"deflated DICOM inflates to more than the {declared} bytes its header declares")
    data = bytes(stream.out)
    del stream
    ds = read_dataset(io.BytesIO(data), False, True)
    del data
    ds.file_meta = meta
    ds.set_original_encoding(False, True, None)
    _check_dicom_size(ds, max_pixels)
    return ds


class _BoundedInflate:
    """A raw-deflate stream from ``fh``, inflated only as far as asked."""

    def __init__(self, fh) -> None:
        self.fh, self.out = fh, bytearray()
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.ended = False  # the stream (or the file) has ended

    def fill(self, limit: int) -> None:
        """Inflate until ``out`` holds ``limit`` bytes or the stream ends; a corrupt stream raises zlib.error."""
        while len(self.out) < limit and not self.ended:
            data = self._inflater.unconsumed_tail or self.fh.read(1 << 16)
            if not data:
                self.ended = True
                break
            self.out += self._inflater.decompress(data, limit - len(self.out))
            self.ended = self._inflater.eof


def dicom_to_uint8(ds: Dataset) -> np.ndarray:
    """First frame of a DICOM dataset as uint8 at full resolution: modality LUT, VOI / window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise ValueError("no Pixel Data element: not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        ds.pixel_array_options(index=0)  # decode only the first frame
    arr = ds.pixel_array
    if frames > 1 and arr.ndim == (4 if int(ds.get("SamplesPerPixel", 1)) > 1 else 3):
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"unsupported PhotometricInterpretation {photometric!r} with shape {arr.shape}")
        return arr if arr.dtype == np.uint8 else _minmax_uint8(arr)  # (H, W, 3): _to_square_uint8 keeps its colour

    def modality(chunk: np.ndarray) -> np.ndarray:  # float64 when rescaled: only ever a chunk at a time
        return apply_modality_lut(chunk, ds)

    window = _voi_output_range(ds)
    if window is not None:
        lo, hi = window
        out = _map_chunks(arr, lambda c: _scale_uint8(apply_voi_lut(modality(c), ds), lo, hi))
    elif modality(arr.reshape(-1)[:1]).dtype == np.uint8 and int(ds.get("BitsStored", 8)) == 8:
        out = _map_chunks(arr, modality)
    else:
        out = _minmax_uint8(arr, modality)
    if photometric == "MONOCHROME1":  # low values are bright: invert so that all sites agree
        out = 255 - out
    return np.ascontiguousarray(out, dtype=np.uint8)


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The output range of the VOI transform ``apply_voi_lut`` will apply, or None when there is none."""
    from pydicom.pixels import apply_voi, apply_windowing

    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        n, first = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
        out = apply_voi(np.arange(first, first + n, dtype=np.int64), ds)  # every LUT entry once
        return float(out.min()), float(out.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        probe = apply_windowing(np.array([-np.inf, np.inf]), ds)  # below / above the window: the limits
        return float(probe[0]), float(probe[1])
    return None


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
