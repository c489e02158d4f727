"""A data site's own images: a MedMNIST npz, a folder of PNG/JPEG files, or DICOM files.

Folder and DICOM sites list their images in a CSV with header ``file,label`` (paths relative to
the data folder; labels are integers, or class names when ``data.classes`` lists them in class-index
order); ``data.labels-column`` names another label column (``file,abnormal,site``: ``"abnormal"``), and
other columns are ignored. Every image becomes a square uint8 array (:mod:`fedtl.data.pixels`; DICOM through
:mod:`fedtl.data.dicom`): ``(S, S)`` grayscale or ``(S, S, 3)`` with colour, so a site yields one
:class:`~fedtl.data.sources.ImageSet` — of 3 channels as soon as one of its images has colour (a grayscale image
among them is its channel repeated, as the backbone's preprocessing would repeat it).

One bad file never stops a site: a missing, corrupt, undecodable or oversized image (or a CSV row
with a bad label) is skipped and reported as a :class:`Problem`. :class:`~fedtl.errors.DataError` is raised
only when the CSV is missing or malformed, or when no image at all could be read. An image's size is checked
from its header before any pixel is decoded (decompression bombs: the two modules above).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedtl.data.dicom import read_dicom_image
from fedtl.data.pixels import _to_square_uint8, read_image_file, stack_images
from fedtl.data.sources import ImageSet, load_medmnist
from fedtl.errors import DataError
from fedtl.site_config import DEFAULT_MAX_PIXELS, SiteDataConfig

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224  # folder / DICOM images are brought to this square size unless data.image-size says
_LOGGED_PROBLEMS = 20  # the warning names this many skipped files; SiteImages.problems holds them all


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
    splits: tuple[str, ...] = ()  # each image's "val" / "test" from the CSV's split column (evaluation data), if any

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
                                     max_pixels=cfg.max_pixels, label_column=cfg.labels_column,
                                     split_column=getattr(cfg, "split_column", ""))
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
    split: str = ""  # "val" / "test" from the split column, when the CSV is read with one


SPLIT_VALUES = {"validation": "val", "val": "val", "test": "test"}  # a split column's values (case-insensitive)


def load_labelled_files(folder: Path, labels_csv: Path, reader: Reader, image_size: int,
                        classes: tuple[str, ...] = (), *, max_pixels: int = DEFAULT_MAX_PIXELS,
                        label_column: str = "label", split_column: str = "") -> SiteImages:
    """Read every file the CSV lists with ``reader(path, image_size, max_pixels=…)``; skip and report the bad
    ones, in CSV order. With ``split_column``, each image's split from that column (:attr:`SiteImages.splits`)."""
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist or is not a folder; set `data.path` to the folder "
                        "the labels CSV's paths are relative to.")
    rows = read_labels_csv(labels_csv, classes, label_column, split_column)
    images = np.empty((len(rows), image_size, image_size), np.uint8)  # (…, 3) from the first colour image on
    labels = np.empty(len(rows), np.int64)
    problems: list[Problem] = []
    splits: list[str] = []
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
        splits.append(row.split)
        kept += 1
    if problems:
        shown = ", ".join(f"{p.file} ({p.reason})" for p in problems[:_LOGGED_PROBLEMS])
        more = f", and {len(problems) - _LOGGED_PROBLEMS} more" if len(problems) > _LOGGED_PROBLEMS else ""
        log.warning("Skipped %d of %d entries listed in %s: %s%s", len(problems), len(rows), labels_csv, shown, more)
    num_classes = len(classes) if classes else int(labels[:kept].max(initial=-1)) + 1
    names = classes or tuple(str(i) for i in range(num_classes))
    return SiteImages(ImageSet(images[:kept].copy(), labels[:kept].copy(), labels_csv.name), names,
                      tuple(problems), len(rows), tuple(splits) if split_column else ())


def read_labels_csv(path: Path, classes: tuple[str, ...] = (), label_column: str = "label",
                    split_column: str = "") -> list[LabelRow]:
    """Every data row of a CSV with columns ``file`` and ``label_column`` (``label`` by default; others are
    ignored), and ``split_column`` when given; rows with a bad label, split, path or a repeat carry a problem."""
    if not path.is_file():
        raise DataError(f"Labels file {path} does not exist; set `data.labels` to a CSV with header `file,label`.")
    index = {name: i for i, name in enumerate(classes)}
    rows: list[LabelRow] = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, skipinitialspace=True)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("file", label_column, *([split_column] if split_column else [])) if c not in header]
            if missing:
                hint = "" if label_column != "label" else \
                    "; if another column holds the labels, name it with `data.labels-column` in site.toml"
                raise DataError(f"Labels file {path} has no {' and no '.join(f'`{c}`' for c in missing)} column; "
                                f"its header is {','.join(header) or '(empty)'!r}, expected "
                                f"`file,{label_column}{',' + split_column if split_column else ''}`{hint}.")
            reader.fieldnames = header
            for record in reader:
                line = reader.line_num
                name, text = (record.get("file") or "").strip(), (record.get(label_column) or "").strip()
                label = _parse_label(text, classes, index)
                split = (record.get(split_column) or "").strip().lower() if split_column else ""
                problem = None
                if not name:
                    name, problem = f"{path.name}:{line}", "row has no file name"
                elif os.path.isabs(name) or Path(os.path.normpath(name)).parts[:1] == ("..",):
                    problem = f"path must be relative to the data folder and stay inside it (line {line})"
                elif name in seen:
                    problem = f"listed again on line {line} (first on line {seen[name]}); the first is used"
                elif isinstance(label, str):
                    problem = f"{label} (line {line})"
                elif split_column and split not in SPLIT_VALUES:
                    problem = (f"`{split_column}` is {split!r}: must be `validation` (or `val`) or `test` "
                               f"(line {line})")
                else:
                    seen[name] = line
                rows.append(LabelRow(name, label if isinstance(label, int) else -1, line, problem,
                                     SPLIT_VALUES.get(split, "")))
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
