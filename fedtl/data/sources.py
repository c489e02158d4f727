"""Image sources: MedMNIST-format ``.npz`` files (the bundled PneumoniaMNIST by default).

A source yields :class:`ImageSet` splits of uint8 images and integer labels. Folder/DICOM
sources used by data sites live in :mod:`fedtl.data.site_sources`.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from fedtl.errors import DataError

BUNDLED_PNEUMONIAMNIST = Path(__file__).parent / "assets" / "pneumoniamnist.npz"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images ``(N, H, W)`` or ``(N, H, W, C)`` uint8 and labels ``(N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels; they must match."
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over shape, dtype and bytes of images and labels: the cache's data key."""
        h = hashlib.sha256()
        for arr in (self.images, self.labels):
            h.update(str((arr.shape, arr.dtype.str)).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def subset(self, indices: np.ndarray, name: str | None = None) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], name or self.name)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True, eq=False)
class MedMNISTSource:
    path: Path
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int

    def split(self, name: str) -> ImageSet:
        if name not in SPLITS:
            raise DataError(f"Unknown split {name!r}; expected one of {', '.join(SPLITS)}.")
        return getattr(self, name)


# MedMNIST v2's own metadata (medmnist.INFO: "task", number of labels) for its 2D data sets; a file named as MedMNIST
# distributes it (``retinamnist.npz``, ``retinamnist_224.npz``, …) and holding that many classes is taken to be it.
MEDMNIST_TASKS = {
    "pathmnist": ("multi-class", 9), "chestmnist": ("multi-label, binary-class", 14), "dermamnist": ("multi-class", 7),
    "octmnist": ("multi-class", 4), "pneumoniamnist": ("binary-class", 2), "retinamnist": ("ordinal-regression", 5),
    "breastmnist": ("binary-class", 2), "bloodmnist": ("multi-class", 8), "tissuemnist": ("multi-class", 8),
    "organamnist": ("multi-class", 11), "organcmnist": ("multi-class", 11), "organsmnist": ("multi-class", 11),
}


def medmnist_task(path: str | Path, num_classes: int = 0) -> str:
    """MedMNIST's task type for a file it distributes (e.g. ``ordinal-regression`` for RetinaMNIST's graded
    classes), from the file's name; '' when the name is not one of :data:`MEDMNIST_TASKS` or ``num_classes``
    (when given) differs from that data set's label count — a renamed or different file makes no claim."""
    match = re.fullmatch(r"([a-z]+mnist)(?:_(?:28|64|128|224))?\.npz", Path(path).name.lower())
    task = MEDMNIST_TASKS.get(match.group(1)) if match else None
    if task is None or (num_classes and num_classes != task[1]):
        return ""
    return task[0]


def resolve_data_path(path: str) -> Path:
    return Path(path).expanduser() if path else BUNDLED_PNEUMONIAMNIST


def load_medmnist(path: str | Path, require: tuple[str, ...] = SPLITS) -> MedMNISTSource:
    """Load a MedMNIST-format npz (keys ``{split}_images`` / ``{split}_labels``), validated.

    Every split in ``require`` must hold at least one image (a simulation or a server needs all three;
    a data site only the split it trains on); the others may be empty.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"Data file {p} is a folder; `data.path` must name a MedMNIST-format .npz file.")
    if not p.is_file():
        raise DataError(
            f"Data file {p} does not exist. Pass a MedMNIST-format .npz via `data.path` "
            "(or leave it empty for the bundled PneumoniaMNIST)."
        )
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError) as exc:
        # zlib.error: a corrupt deflate stream; NotImplementedError: a compression zipfile cannot read
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"Data file {p} is not a readable .npz archive ({reason}); re-download it.") from exc
    missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in arrays]
    if missing:
        raise DataError(f"Data file {p} lacks the MedMNIST keys {', '.join(missing)}; found {', '.join(sorted(arrays))}.")
    sets = {}
    for s in SPLITS:
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{p}: `{s}_images` must be uint8 of shape (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}."
            )
        if labels.ndim == 0 or labels.dtype.kind not in "iub" \
                and not (labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
            raise DataError(f"{p}: `{s}_labels` must hold integer class indices, got {labels.dtype} {labels.shape}.")
        if len(images) == 0 and s in require:
            raise DataError(f"{p}: the `{s}` split holds no images; it needs at least one "
                            f"(`{s}_images` has shape {images.shape}).")
        labels = labels.reshape(labels.shape[0], -1) if labels.size else labels.reshape(labels.shape[0], 1)
        if labels.shape[1] != 1:
            raise DataError(f"{p}: `{s}_labels` must hold one label per image (multi-label is not supported), got shape {labels.shape}.")
        sets[s] = ImageSet(images, labels[:, 0].astype(np.int64), f"{p.name}:{s}")
    num_classes = int(max(int(sets[s].labels.max(initial=0)) for s in SPLITS)) + 1
    if num_classes < 2:
        raise DataError(f"{p}: labels hold a single class; a classifier needs at least two.")
    if any(int(sets[s].labels.min(initial=0)) < 0 for s in SPLITS):
        raise DataError(f"{p}: labels must be >= 0.")
    return MedMNISTSource(p, sets["train"], sets["val"], sets["test"], num_classes)


def write_medmnist_sample(path: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0,
                          source: str | Path = BUNDLED_PNEUMONIAMNIST) -> Path:
    """A MedMNIST-format npz of ``n_*`` images drawn (without replacement, reproducibly from ``seed``) from
    each split of ``source``: real images, fewer of them (tests, benchmarks, small demos)."""
    rng = np.random.default_rng(seed)
    with np.load(source) as z:
        arrays = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            idx = rng.choice(z[f"{split}_images"].shape[0], size=n, replace=False)
            arrays[f"{split}_images"] = z[f"{split}_images"][idx]
            arrays[f"{split}_labels"] = z[f"{split}_labels"][idx]
    np.savez_compressed(path, **arrays)
    return Path(path)
