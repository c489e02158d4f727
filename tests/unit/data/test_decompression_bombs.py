"""Hostile image files: a small file that decodes to a huge image is refused from its header, named and skipped.

Every bomb here is built the way an attacker would (tiny file, huge declared image); the tests check
that it is refused before decoding -- Pillow's decoder is never called, a deflated DICOM is not
inflated past its header -- and that accepted DICOM frames convert a chunk at a time with the same
result as converting the whole frame at once.
"""

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless,
                         SecondaryCaptureImageStorage, generate_uid)

from fedtl.data import dicom, pixels
from fedtl.data.dicom import dicom_to_uint8, read_dicom, read_dicom_image
from fedtl.data.pixels import read_image_file
from fedtl.data.site_sources import load_site_data
from fedtl.site_config import SiteDataConfig

LIMIT = 1_000_000  # data.max-pixels in these tests: 1 Mpx, so that a bomb of a few Mpx stays fast to build


def png_bomb(path, width, height):
    """A valid grayscale PNG of zeros, compressed as it streams: a few KB on disk, width x height decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte + one row
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def dicom_file(path, rows, cols, *, syntax=ExplicitVRLittleEndian, pixels=None, slope=None, window=None):
    """A 16-bit MONOCHROME2 DICOM of ``rows`` x ``cols`` (zeros unless ``pixels``), in transfer syntax ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    data = np.zeros((rows, cols), "<u2") if pixels is None else pixels.astype("<u2")
    ds.PixelData = data.tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
    except ValueError as exc:
        err = exc
    else:
        err = None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, err


def test_png_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    bomb = png_bomb(tmp_path / "bomb.png", 2000, 2000)  # 4 Mpx from a few KB
    assert bomb.stat().st_size < 20_000
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the bomb was decoded"))
    with pytest.raises(ValueError, match=r"image is 2000x2000 = 4\.0 Mpx, above data\.max-pixels = 1\.0 Mpx"):
        read_image_file(bomb, 16, max_pixels=LIMIT)


def test_images_at_the_limit_are_read(tmp_path):
    Image.fromarray(np.full((1000, 1000), 77, np.uint8)).save(tmp_path / "ok.png")
    assert read_image_file(tmp_path / "ok.png", 8, max_pixels=LIMIT).tolist() == [[77] * 8] * 8


def test_deflated_dicom_bomb_is_refused_before_it_is_inflated(tmp_path):
    bomb = dicom_file(tmp_path / "bomb.dcm", 2000, 2000, syntax=DeflatedExplicitVRLittleEndian)  # 8 MB inflated
    assert bomb.stat().st_size < 20_000
    peak, err = _peak_bytes(lambda: read_dicom(bomb, LIMIT))
    assert "image is 2000x2000 = 4.0 Mpx, above data.max-pixels = 1.0 Mpx" in str(err)
    assert peak < 1_000_000, f"{peak} bytes allocated refusing an 8 MB bomb"


def test_rle_dicom_bomb_is_refused_before_its_pixels_are_decoded(tmp_path, monkeypatch):
    bomb = dicom_file(tmp_path / "rle.dcm", 2000, 2000, syntax=RLELossless)
    assert bomb.stat().st_size < 200_000  # RLE runs are at most 128 bytes: 8 MB in 130 KB
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("the bomb was decoded")))
    with pytest.raises(ValueError, match="above data.max-pixels"):
        read_dicom_image(bomb, 16, max_pixels=LIMIT)


def test_native_multiframe_counts_every_frame_it_would_read(tmp_path):
    path = tmp_path / "mf.dcm"
    dicom_file(path, 600, 600)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames, ds.PixelData = 3, ds.PixelData * 3  # 3 x 0.36 Mpx, all read from the file
    ds.save_as(path)
    with pytest.raises(ValueError, match=r"600x600 x 3 frames = 1\.1 Mpx"):
        read_dicom(path, LIMIT)


def test_deflated_dicom_that_inflates_past_its_header_is_refused(tmp_path):
    path = dicom_file(tmp_path / "liar.dcm", 10, 10, syntax=DeflatedExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    ds.add_new(0x7FE11010, "OB", b"\0" * (3 << 20))  # 3 MB of zeros in a private element after Pixel Data
    ds.save_as(path)
    with pytest.raises(ValueError, match="inflates to more than"):
        read_dicom(path, LIMIT)


def test_deflated_dicom_with_a_corrupt_stream_is_named_and_skipped(tmp_path):
    good = dicom_file(tmp_path / "good.dcm", 8, 8, syntax=DeflatedExplicitVRLittleEndian,
                      pixels=np.arange(64).reshape(8, 8) * 60)
    raw = bytearray(good.read_bytes())
    raw[-40:] = b"\xff" * 40
    (tmp_path / "bad.dcm").write_bytes(bytes(raw))
    (tmp_path / "l.csv").write_text("file,label\ngood.dcm,0\nbad.dcm,1\n")
    site = load_site_data(SiteDataConfig(format="dicom", path=tmp_path, labels=tmp_path / "l.csv", image_size=8))
    assert len(site.images) == 1 and [p.file for p in site.problems] == ["bad.dcm"]
    # a deflated file is read exactly as pydicom reads it in full
    np.testing.assert_array_equal(read_dicom_image(good, 8), dicom_to_uint8(pydicom.dcmread(good)))


def test_oversized_files_are_named_and_skipped_at_a_site(tmp_path):
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(tmp_path / "ok.png")
    png_bomb(tmp_path / "bomb.png", 1500, 1000)
    (tmp_path / "l.csv").write_text("file,label\nbomb.png,1\nok.png,0\n")
    cfg = SiteDataConfig(format="folder", path=tmp_path, labels=tmp_path / "l.csv", image_size=8, max_pixels=LIMIT)
    site = load_site_data(cfg)
    assert len(site.images) == 1 and dict(site.problems) == {
        "bomb.png": "ImageTooLarge: image is 1500x1000 = 1.5 Mpx, above data.max-pixels = 1.0 Mpx; not decoded"}


@pytest.mark.parametrize("slope,window", [(None, None), (2.5, None), (None, (2048, 2048)), (0.5, (300, 900))])
def test_chunked_conversion_equals_whole_frame_float64(tmp_path, monkeypatch, slope, window):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4096, (37, 53))
    ds = pydicom.dcmread(dicom_file(tmp_path / "x.dcm", 37, 53, pixels=frame, slope=slope, window=window))
    monkeypatch.setattr(pixels, "_CHUNK", 100)  # 20 chunks
    chunked = dicom_to_uint8(ds)
    whole = apply_modality_lut(ds.pixel_array, ds)  # the reference: float64 over the whole frame
    if window is not None:
        lo, hi = dicom._voi_output_range(ds)
        whole = apply_voi_lut(whole, ds)
    else:
        lo, hi = float(whole.min()), float(whole.max())
    expected = np.clip(np.rint((whole.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(chunked, expected)
    assert chunked.min() == 0 and chunked.max() == 255


def test_16_bit_png_is_stretched_a_chunk_at_a_time(tmp_path, monkeypatch):
    img = np.linspace(1000, 3000, 40 * 40).reshape(40, 40).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    (tmp_path / "deep.png").write_bytes(buf.getvalue())
    monkeypatch.setattr(pixels, "_CHUNK", 64)
    out = read_image_file(tmp_path / "deep.png", 40)
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out.ravel().astype(int)) >= 0)
