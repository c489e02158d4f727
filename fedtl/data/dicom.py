"""DICOM files as a site reads them: the first frame as uint8, with its size checked before it is decoded.

Pixels go through the modality LUT (rescale slope / intercept), then the VOI LUT or window (center / width);
the window's output range is mapped to 0-255. Without a VOI, data wider than 8 bits is scaled from its own
min-max. MONOCHROME1 is inverted so that bright is always dense tissue, and a multi-frame file contributes its
first frame.

Decompression bombs: the header is parsed without its Pixel Data and its frame size checked against
``data.max-pixels`` first; a deflate-compressed file is inflated only as far as its header, then only to the size
that header declares. Accepted frames are converted a chunk at a time (:mod:`fedtl.data.pixels`).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtl.data.pixels import _map_chunks, _minmax_uint8, _scale_uint8, _to_square_uint8, check_pixels
from fedtl.site_config import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_DEFLATED_HEADER_LIMIT = 16 << 20  # inflated bytes searched for a deflated DICOM's header before giving up
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float / Double Float Pixel Data


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
