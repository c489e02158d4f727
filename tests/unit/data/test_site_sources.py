"""A site's own images: folders of PNG/JPEG, DICOM, MedMNIST; bad files are skipped and named."""

import dataclasses
import logging

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedtl.data.dicom import dicom_to_uint8, read_dicom_image
from fedtl.data.pixels import read_image_file
from fedtl.data.site_sources import load_site_data
from fedtl.errors import DataError
from fedtl.site_config import SiteDataConfig

# 12-bit test pattern: below, inside and above a window centred at 2048 with width 2048 ([1024, 3072))
PATTERN = np.array([[0, 1000, 1024, 1536], [2048, 2560, 3072, 4095]], dtype=np.uint16)


def write_dicom(path, pixels, photometric="MONOCHROME2", *, center=None, width=None, slope=None, intercept=None,
                bits_stored=12, with_pixels=True):
    """An uncompressed 16-bit DICOM (Explicit VR Little Endian); ``pixels`` (H, W) or (F, H, W) for multi-frame."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if with_pixels:
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def as_uint8(path):
    return dicom_to_uint8(pydicom.dcmread(path))


def write_csv(path, rows, header="file,label"):
    path.write_text("\n".join([header, *(f"{f},{lab}" for f, lab in rows)]) + "\n")
    return path


@pytest.fixture
def png_site(tmp_path):
    """Dark images are `normal`, bright ones `pneumonia`; one corrupt file, one listed but missing."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.full((20, 30), 10, np.uint8)).save(folder / "dark.png")
    Image.fromarray(np.full((40, 40, 3), 240, np.uint8)).save(folder / "sub" / "bright_rgb.png")
    Image.fromarray(np.full((24, 24), 20, np.uint8)).save(folder / "dark.jpg", quality=95)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    labels = write_csv(tmp_path / "labels.csv", [("dark.png", "normal"), ("sub/bright_rgb.png", "pneumonia"),
                                                 ("corrupt.png", "normal"), ("gone.png", "pneumonia"),
                                                 ("dark.jpg", "normal")])
    return folder, labels


def folder_cfg(folder, labels, size=16, classes=("normal", "pneumonia"), fmt="folder"):
    return SiteDataConfig(format=fmt, path=folder, labels=labels, image_size=size, classes=tuple(classes))


def test_folder_site_reads_good_files_and_names_the_bad_ones(png_site, caplog):
    folder, labels = png_site
    with caplog.at_level(logging.WARNING, logger="fedtl"):
        site = load_site_data(folder_cfg(folder, labels))
    assert site.images.images.shape == (3, 16, 16) and site.images.images.dtype == np.uint8
    assert site.images.labels.tolist() == [0, 1, 0] and site.images.labels.dtype == np.int64
    means = site.images.images.reshape(3, -1).mean(axis=1)
    assert means[0] == 10 and means[1] == 240 and abs(means[2] - 20) <= 2  # rows stay with their labels (JPEG ±2)
    assert site.class_counts() == {"normal": 2, "pneumonia": 1} and site.listed == 5
    reasons = dict(site.problems)
    assert set(reasons) == {"corrupt.png", "gone.png"}
    assert reasons["gone.png"] == "file does not exist"
    assert "corrupt.png" in caplog.text and "gone.png" in caplog.text


def test_16_bit_png_is_stretched_and_integer_labels_need_no_class_list(tmp_path):
    img = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(img).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as saved:
        assert saved.mode.startswith("I")  # really a 16-bit file
    out = read_image_file(tmp_path / "deep.png", 16)
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out.ravel().astype(int)) >= 0)
    labels = write_csv(tmp_path / "l.csv", [("deep.png", 1)])
    site = load_site_data(folder_cfg(tmp_path, labels, classes=()))
    assert site.class_names == ("0", "1") and site.images.labels.tolist() == [1]


def test_bad_rows_are_skipped_with_the_reason(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    labels = write_csv(tmp_path / "l.csv", [("a.png", "normal"), ("b.png", "covid"), ("a.png", "normal"),
                                            ("c.png", 7), ("../outside.png", 0)])
    site = load_site_data(folder_cfg(tmp_path, labels))
    assert len(site.images) == 1 and site.listed == 5
    reasons = [p.reason for p in site.problems]
    assert "label 'covid' is not one of data.classes (normal, pneumonia)" in reasons[0]
    assert "listed again on line 4" in reasons[1]
    assert "label 7 is out of range (allowed: 0..1)" in reasons[2]
    assert "stay inside" in reasons[3]
    names = write_csv(tmp_path / "n.csv", [("a.png", "normal")])
    with pytest.raises(DataError, match="No image could be read") as err:
        load_site_data(folder_cfg(tmp_path, names, classes=()))
    assert "list class names in `data.classes`" in str(err.value)


def test_csv_with_bom_spaces_and_extra_columns_is_read(tmp_path):
    Image.fromarray(np.full((8, 8), 99, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("\ufefffile, label, note\na.png, pneumonia, left\n\n", encoding="utf-8")
    site = load_site_data(folder_cfg(tmp_path, tmp_path / "l.csv", size=8))
    assert site.images.labels.tolist() == [1] and site.images.images[0, 0, 0] == 99 and site.problems == ()


@pytest.mark.parametrize("content,fragment", [
    (None, "does not exist"),
    ("path,label\na.png,0\n", "no `file` column"),
    ("file,class\na.png,0\n", "no `label` column"),
    ("", "no `file` and no `label` column"),
    ("file,label\n", "lists no files"),
])
def test_missing_or_malformed_csv_is_a_data_error(tmp_path, content, fragment):
    csv_path = tmp_path / "labels.csv"
    if content is not None:
        csv_path.write_text(content)
    with pytest.raises(DataError, match="Labels file") as err:
        load_site_data(folder_cfg(tmp_path, csv_path))
    assert fragment in str(err.value)


def test_no_readable_image_is_a_data_error_unless_allowed(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    labels = write_csv(tmp_path / "l.csv", [("x.png", 0), ("y.png", 1)])
    cfg = folder_cfg(tmp_path, labels, classes=())
    with pytest.raises(DataError, match=r"No image could be read .*\(2 listed\).*x\.png.*y\.png: file does not exist"):
        load_site_data(cfg)
    empty = load_site_data(cfg, allow_empty=True)
    assert len(empty.images) == 0 and [p.file for p in empty.problems] == ["x.png", "y.png"]
    with pytest.raises(DataError, match="Image folder .* does not exist"):
        load_site_data(folder_cfg(tmp_path / "nope", labels))


# ---- DICOM ---------------------------------------------------------------------------------------------

def test_window_maps_to_full_range_and_monochrome1_is_inverted(tmp_path):
    m2 = as_uint8(write_dicom(tmp_path / "m2.dcm", PATTERN, "MONOCHROME2", center=2048, width=2048))
    m1 = as_uint8(write_dicom(tmp_path / "m1.dcm", PATTERN, "MONOCHROME1", center=2048, width=2048))
    assert m2.dtype == np.uint8 and m2.shape == PATTERN.shape
    assert m2[0, 0] == 0 and m2[0, 1] == 0  # below the window
    assert m2[1, 2] == 255 and m2[1, 3] == 255  # at / above its upper edge
    assert m2[0, 2] <= 1 and abs(int(m2[1, 0]) - 128) <= 1  # window floor -> ~0, centre -> ~128
    assert np.all(np.diff(m2.ravel().astype(int)) >= 0)  # monotonic
    np.testing.assert_array_equal(m1, 255 - m2)


def test_rescale_is_applied_before_the_window(tmp_path):
    # stored s -> 2*s - 2048, so the same window in output units sits at stored values [1536, 2560)
    img = as_uint8(write_dicom(tmp_path / "r.dcm", PATTERN, center=2048, width=2048, slope=2, intercept=-2048))
    assert img[0, 3] == 0 and img[1, 2] == 255 and abs(int(img[1, 0]) - 128) <= 1


def test_without_window_16_bit_data_is_stretched_and_multiframe_takes_the_first_frame(tmp_path):
    frames = np.stack([PATTERN, 4095 - PATTERN])
    first = as_uint8(write_dicom(tmp_path / "mf.dcm", frames))
    assert first.shape == PATTERN.shape and first[0, 0] == 0 and first[1, 3] == 255
    np.testing.assert_array_equal(first, as_uint8(write_dicom(tmp_path / "single.dcm", PATTERN)))
    resized = read_dicom_image(tmp_path / "mf.dcm", 32)
    assert resized.shape == (32, 32) and resized[0, 0] == 0 and resized[-1, -1] == 255


def test_dicom_site_skips_corrupt_files_by_name(tmp_path, caplog):
    write_dicom(tmp_path / "good1.dcm", PATTERN, center=2048, width=2048)
    write_dicom(tmp_path / "good2.dcm", PATTERN, "MONOCHROME1", center=2048, width=2048)
    write_dicom(tmp_path / "nopixels.dcm", PATTERN, with_pixels=False)
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 64 + b"garbage")
    whole = (tmp_path / "good1.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(whole[: len(whole) - 10])
    labels = write_csv(tmp_path / "l.csv", [("good1.dcm", 0), ("garbage.dcm", 1), ("nopixels.dcm", 1),
                                            ("truncated.dcm", 0), ("good2.dcm", 1)])
    with caplog.at_level(logging.WARNING, logger="fedtl"):
        site = load_site_data(folder_cfg(tmp_path, labels, size=8, classes=(), fmt="dicom"))
    assert len(site.images) == 2 and site.images.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(site.images.images[1], 255 - site.images.images[0])
    reasons = dict(site.problems)
    assert set(reasons) == {"garbage.dcm", "nopixels.dcm", "truncated.dcm"}
    assert "not a DICOM file" in reasons["garbage.dcm"] and "no Pixel Data" in reasons["nopixels.dcm"]
    assert all(name in caplog.text for name in reasons)


# ---- MedMNIST ------------------------------------------------------------------------------------------

def test_medmnist_site_uses_its_split_resized(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "m.npz", **arrays)
    train = load_site_data(SiteDataConfig(format="medmnist", path=tmp_path / "m.npz", image_size=16))
    assert train.images.images.shape == (6, 16, 16) and train.class_counts() == {"0": 3, "1": 3}
    val = load_site_data(SiteDataConfig(format="medmnist", path=tmp_path / "m.npz", image_size=16, split="val",
                                        classes=("normal", "pneumonia")))
    assert len(val.images) == 3 and val.class_counts() == {"normal": 2, "pneumonia": 1}
    same = load_site_data(SiteDataConfig(format="medmnist", path=tmp_path / "m.npz", image_size=8))
    np.testing.assert_array_equal(same.images.images, arrays["train_images"])


def test_medmnist_site_keeps_native_size_by_default(tmp_path):
    from fedtl.data import BUNDLED_PNEUMONIAMNIST

    site = load_site_data(SiteDataConfig(format="medmnist", path=BUNDLED_PNEUMONIAMNIST, split="test"))
    assert site.images.images.shape == (624, 28, 28) and site.class_counts() == {"0": 234, "1": 390}


def test_labels_column_names_the_csv_column_that_holds_the_labels(tmp_path):
    """A hospital's export `file,abnormal,site`: `data.labels-column = "abnormal"` reads it as it is."""
    for name, value in (("a.png", 30), ("b.png", 220)):
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / name)
    csv_path = tmp_path / "export.csv"
    csv_path.write_text("file,abnormal,site\na.png,0,3\nb.png,1,7\n")
    cfg = dataclasses.replace(folder_cfg(tmp_path, csv_path, size=8, classes=()), labels_column="abnormal")
    site = load_site_data(cfg)
    assert site.images.labels.tolist() == [0, 1] and site.images.images[:, 0, 0].tolist() == [30, 220]
    # the default column `label` is absent: the error names the setting that fixes it
    with pytest.raises(DataError, match="no `label` column.*`data.labels-column`"):
        load_site_data(folder_cfg(tmp_path, csv_path, size=8, classes=()))
    # a named column that is absent is named too
    with pytest.raises(DataError, match="no `finding` column; its header is 'file,abnormal,site'"):
        load_site_data(dataclasses.replace(cfg, labels_column="finding"))


# ---- colour ------------------------------------------------------------------------------------------------

def _colour(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[..., 0] = 200  # a red cast: the channels differ
    return img


def test_colour_images_keep_their_colour_and_grayscale_ones_in_a_colour_site_get_three_equal_channels(tmp_path):
    """Fundus photographs read from a folder were averaged to gray; colour is information the prefix uses."""
    from fedtl.inference import read_inputs

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(folder / "gray.png")
    Image.fromarray(_colour(30, 30)).save(folder / "fundus.png")
    Image.fromarray(np.dstack([np.full((12, 12), 70, np.uint8)] * 3)).save(folder / "xray_saved_as_rgb.png")
    Image.fromarray(_colour(16, 16, 1)).convert("RGBA").save(folder / "alpha.png")
    labels = write_csv(tmp_path / "labels.csv", [("gray.png", 0), ("fundus.png", 1), ("xray_saved_as_rgb.png", 0),
                                                 ("alpha.png", 1)])
    assert read_image_file(folder / "xray_saved_as_rgb.png", 16).shape == (16, 16)  # equal channels: gray
    fundus = read_image_file(folder / "fundus.png", 16)
    assert fundus.shape == (16, 16, 3) and not np.array_equal(fundus[..., 0], fundus[..., 1])
    site = load_site_data(SiteDataConfig(format="folder", path=folder, labels=labels, image_size=16))
    images = site.images.images
    assert images.shape == (4, 16, 16, 3) and site.problems == ()
    assert (images[0] == 90).all() and (images[2] == 70).all()  # gray, repeated into the three channels
    np.testing.assert_array_equal(images[1], fundus)
    assert images[3].shape == (16, 16, 3) and not np.array_equal(images[3][..., 0], images[3][..., 2])  # alpha dropped
    # `fedtl predict` reads the same files into the same arrays
    _, predicted, problems = read_inputs([folder / n for n in ("gray.png", "fundus.png", "xray_saved_as_rgb.png",
                                                              "alpha.png")], 16)
    assert problems == [] and np.array_equal(predicted, images)
    # a site of grayscale images only stays (N, S, S)
    gray_only = write_csv(tmp_path / "gray.csv", [("gray.png", 0), ("xray_saved_as_rgb.png", 1)])
    assert load_site_data(SiteDataConfig(format="folder", path=folder, labels=gray_only,
                                         image_size=16)).images.images.shape == (2, 16, 16)


def test_a_colour_medmnist_site_resized_and_a_colour_dicom_keep_their_colour(tmp_path):
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = np.stack([_colour(8, 8, i) for i in range(n)])
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "rgb.npz", **arrays)
    resized = load_site_data(SiteDataConfig(format="medmnist", path=tmp_path / "rgb.npz", image_size=16))
    assert resized.images.images.shape == (4, 16, 16, 3)
    assert not np.array_equal(resized.images.images[..., 0], resized.images.images[..., 1])
    native = load_site_data(SiteDataConfig(format="medmnist", path=tmp_path / "rgb.npz"))
    np.testing.assert_array_equal(native.images.images, arrays["train_images"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "c.dcm"), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = "XC", 3, "RGB", 0
    ds.Rows, ds.Columns = 10, 10
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = _colour(10, 10, 5)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    out = read_dicom_image(tmp_path / "c.dcm", 10)
    np.testing.assert_array_equal(out, pixels)
