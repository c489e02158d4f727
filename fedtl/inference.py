"""Predictions from a finished run: the pinned backbone, the selected suffix, the run's decision rule.

    run dir ─► config.json (backbone, resolution, cut, adapters) + suffix.safetensors (tensors, metadata)
    image file ─► uint8 (S, S) gray or (S, S, 3) colour, as a data site reads it ─► backbone preprocessing ─► prefix ─► suffix
              ─► softmax (N, C) ─► decision rule ─► label

Files are read exactly as a data site reads its training images (:func:`fedtl.data.pixels.read_image_file`
for PNG / JPEG, :func:`~fedtl.data.dicom.read_dicom_image` for DICOM: LUTs, windowing, MONOCHROME1),
then go through the same :class:`~fedtl.data.preprocess.Preprocessing` and :class:`~fedtl.model.TransferModel`
as training and evaluation. The backbone's weights are checked against the sha256 the run recorded.
An unreadable file is skipped and reported by name; it never stops the others.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtl.config import FedTLConfig
from fedtl.data.preprocess import Preprocessing, shift_view
from fedtl.data.dicom import read_dicom_image
from fedtl.data.pixels import read_image_file, stack_images
from fedtl.data.site_sources import DEFAULT_IMAGE_SIZE, Problem, _reason
from fedtl.decision import DECISION_FROM, Decision, decision_from_metadata
from fedtl.errors import BackboneError, ConfigError
from fedtl.model import TransferModel
from fedtl.site_config import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
_HEAD_BIAS = re.compile(r"^suffix\.head\.(\d+)\.bias$")
_CUTS = re.compile(r"^suffix\.head\.\d+\.cuts$")


@dataclass(frozen=True, eq=False)
class RunModel:
    """A finished run's model, ready to predict: everything comes from the run directory."""

    run_dir: Path
    config: FedTLConfig
    model: TransferModel  # eval mode, the selected suffix loaded
    preprocessing: Preprocessing
    decision: Decision
    metadata: dict[str, str]  # suffix.safetensors metadata (backbone, weights_sha256, round, split, …)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def resolution(self) -> int:
        return self.preprocessing.resolution

    @property
    def views(self) -> int:
        """Test-time views a prediction averages (``evaluation.views``; 1 for a run made before they existed)."""
        return self.config.eval_views

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB → float32 ``(N, C)`` class probabilities: the mean
        over the run's test-time views (:func:`fedtl.data.preprocess.shift_view`), as its evaluation scored them."""
        self.model.eval()
        out = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            if self.views <= 1:
                logits = self.model(self.preprocessing(batch))
            else:
                pre = self.preprocessing
                unit = pre.to_unit(batch)
                feats = torch.stack([self.model.prefix_features(pre.normalize(shift_view(unit, k)))
                                     for k in range(self.views)], 1)  # (B, K, D): the suffix takes the mean
                logits = self.model.suffix(feats)
            out.append(logits.softmax(-1))
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)


def _read_suffix(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc}).") from exc


def _personal(path: Path, run_meta: dict[str, str], run: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A site's personal suffix (``<state dir>/personal-suffix.safetensors``) that replaces ``run``'s: it must say it
    is one, and name the run's id and pinned weights when it records them (older files do not)."""
    if not path.is_file():
        raise ConfigError(f"--suffix {path} does not exist; a site's personal suffix is `personal-suffix.safetensors` "
                          "in its state dir.")
    meta, state = _read_suffix(path)
    if "kept" not in meta:
        raise ConfigError(f"{path} is not a site's personal suffix (its metadata has no `kept` entry); pass the "
                          "`personal-suffix.safetensors` a personalized run left in the site's state dir.")
    theirs, ours = meta.get("run", ""), run_meta.get("run", "")
    if theirs and ours and theirs != ours:
        raise ConfigError(f"{path} was fine-tuned from run `{theirs}`, but {run} is run `{ours}`; pass that run's "
                          "directory.")
    pin = meta.get("weights_sha256", "")
    if pin and pin != run_meta.get("weights_sha256", ""):
        raise BackboneError(f"{path} was fine-tuned on backbone weights {pin[:16]}…, but {run} pinned "
                            f"{run_meta.get('weights_sha256', '')[:16]}…: not this run's prefix.")
    return meta, state


def load_run(run_dir: str | Path, suffix: str | Path | None = None) -> RunModel:
    """The model of a finished run: config.json's architecture, the pinned weights (hash checked), the selected suffix
    — or, with ``suffix``, a site's personal suffix of that run, with the decision rule the site chose on its own
    validation split (the run's when the site kept the global suffix and its split was too small to choose one;
    the argmax for an older file without a rule)."""
    from fedtl.backbones import build_backbone

    run = check_run_dir(run_dir)
    suffix_path, config_path = run / "suffix.safetensors", run / "config.json"
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path} is not readable JSON ({exc}).") from exc
    if isinstance(values, dict):  # runs made before `model.pooling` existed pooled the maps by their mean
        values.setdefault("model.pooling", "avg")
        values.setdefault("evaluation.views", 1)  # … and before test-time views: the image alone
    cfg = FedTLConfig.from_run_config(values)
    meta, state = _read_suffix(suffix_path)
    num_classes = _num_classes(state, suffix_path)  # the run's: a personal suffix must fit the run's model
    personal: dict[str, str] = {}
    if suffix is not None:
        personal, state = _personal(Path(suffix), meta, run)
    if meta.get("backbone", cfg.model.backbone) != cfg.model.backbone:
        raise ConfigError(f"{suffix_path} was trained on backbone `{meta['backbone']}` but config.json names "
                          f"`{cfg.model.backbone}`; the run directory is inconsistent.")
    backbone = build_backbone(cfg.model.backbone)
    pinned = meta.get("weights_sha256", "")
    if not pinned:
        raise BackboneError(f"{suffix_path} records no `weights_sha256`; cannot prove the backbone is the run's.")
    if backbone.weights_sha256 != pinned:
        raise BackboneError(f"The local `{cfg.model.backbone}` weights have sha256 {backbone.weights_sha256[:16]}…, "
                            f"but the run pinned {pinned[:16]}…: a different prefix. Install the run's weights "
                            "(TORCH_HOME / FEDTL_WEIGHTS_DIR) before predicting.")
    model = TransferModel(backbone, num_classes, cfg.model, cfg.adapters, seed=cfg.train.seed)
    model.load_trainable_state(state)  # names, shapes, dtypes, finite values checked
    model.eval()
    decision = decision_from_metadata(personal if suffix is not None and personal.get(DECISION_FROM) != "run" else meta)
    decision.check_classes(model.num_classes)
    if suffix is not None:  # what `predict` names: the site's file, and whether it kept the fine-tuned suffix
        meta = {**meta, "personal": str(suffix), "site": personal.get("site", "?"), "kept": personal["kept"],
                "dp": personal.get("dp", "true"), "personalization": personal.get("personalization", "finetune")}
    from fedtl.backbones import get_spec

    pre = Preprocessing.for_backbone(get_spec(cfg.model.backbone), cfg.model.resolution)
    return RunModel(run, cfg, model, pre, decision, meta)


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, if it holds what a prediction needs (config.json, suffix.safetensors); cheap."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"Run directory {run} does not exist; pass the --out folder of a finished `fedtl simulate` "
                          "(or a deployment's output.dir).")
    for name in ("config.json", "suffix.safetensors"):
        if not (run / name).is_file():
            raise ConfigError(f"{run} holds no {name}; it is not a finished run (summary.json is written last).")
    return run


def _num_classes(state: dict[str, torch.Tensor], path: Path) -> int:
    cuts = [k for k in state if _CUTS.match(k)]  # an ordinal head: C − 1 cut points
    if cuts:
        shape = tuple(state[cuts[0]].shape)
        if len(shape) != 1 or shape[0] < 1:
            raise ConfigError(f"{path}: `{cuts[0]}` has shape {shape}; an ordinal head's cut points are one vector.")
        return shape[0] + 1
    layers = sorted((int(m.group(1)), k) for k in state if (m := _HEAD_BIAS.match(k)))
    if not layers:
        raise ConfigError(f"{path} holds no head (`suffix.head.N.bias`); it is not a fedtl suffix.")
    return int(state[layers[-1][1]].shape[0])


# ---- inputs -----------------------------------------------------------------------------------------------

def is_dicom(path: Path) -> bool:
    """By suffix, else by the DICOM preamble (``DICM`` at byte 128), as PACS exports often have no suffix."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Files named, and the image / DICOM files under folders named (sorted, recursively); missing inputs are problems.

    A file named on the command line is always tried; inside a folder only PNG / JPEG / DICOM files are taken
    (DICOM also without a suffix, by its preamble), so a folder's notes or CSVs are not reported as unreadable.
    """
    files: list[Path] = []
    problems: list[Problem] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and (
                q.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES or (q.suffix == "" and is_dicom(q))))
            if not found:
                problems.append(Problem(str(p), "folder holds no PNG, JPEG or DICOM file"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(Problem(str(p), "does not exist" if not p.exists() else "not a regular file"))
    return files, problems


def read_inputs(files: Iterable[Path], image_size: int = DEFAULT_IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> tuple[list[Path], np.ndarray, list[Problem]]:
    """Read each file as a data site would: ``(read files, (N, S, S) or (N, S, S, 3) uint8, problems)``."""
    read: list[Path] = []
    arrays: list[np.ndarray] = []
    problems: list[Problem] = []
    for path in files:
        reader = read_dicom_image if is_dicom(path) else read_image_file
        try:
            arrays.append(reader(path, image_size, max_pixels=max_pixels))
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; one bad file must not stop the rest
            problems.append(Problem(str(path), _reason(exc)))
            continue
        read.append(path)
    return read, stack_images(arrays, image_size), problems  # one colour image: all get 3 channels, as at a site


# ---- predictions ------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Predictions:
    files: list[Path]
    probabilities: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64, by the run's decision rule
    problems: list[Problem]
    class_names: tuple[str, ...] = ()  # the run's model.class-names, when it has them

    def csv_rows(self) -> list[list[str]]:
        named = len(self.class_names) == self.probabilities.shape[1]
        header = ["file", *(f"prob_{c}" for c in range(self.probabilities.shape[1])), "label"] + \
            (["label_name"] if named else [])
        rows = [[str(f), *(f"{p:.8f}" for p in probs), str(int(label))] + ([self.class_names[int(label)]] if named else [])
                for f, probs, label in zip(self.files, self.probabilities, self.labels)]
        return [header, *rows]


def predict_files(run: RunModel, inputs: Sequence[str | Path], image_size: int = DEFAULT_IMAGE_SIZE,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Predictions:
    files, problems = collect_inputs(inputs)
    read, images, bad = read_inputs(files, image_size, max_pixels)
    return predict_images(run, read, images, problems + bad)


def predict_images(run: RunModel, files: list[Path], images: np.ndarray, problems: list[Problem]) -> Predictions:
    """Predictions for images already read (``files[i]`` holds ``images[i]``)."""
    probs = run.probabilities(images)
    return Predictions(files, probs, run.decision.apply(probs) if len(files) else np.zeros(0, np.int64), problems,
                       run.config.model.names)


def write_csv(rows: list[list[str]], out: Path | None) -> None:
    """The CSV to ``out`` (atomically: a complete file or none) or to stdout."""
    import csv
    import sys

    if out is None:
        csv.writer(sys.stdout, lineterminator="\n").writerows(rows)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
