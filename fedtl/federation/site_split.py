"""A deployed site's evaluation split: which of its images it holds out and which of those are validation and test,
made once and stored in ``<state-dir>/evaluation-split.json`` so that held-out images never reach training across
runs and resumes."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from fedtl.errors import DataError
from fedtl.files import write_atomically
from fedtl.site_config import SiteConfig

log = logging.getLogger(__name__)

SPLIT_FILE = "evaluation-split.json"


def _split_column(site: SiteConfig) -> str:
    return site.evaluation.data.split_column if site.evaluation.data is not None else ""


def _split_identity(site: SiteConfig, images, splits: tuple[str, ...] = ()) -> dict:
    ev = site.evaluation
    key = {"fingerprint": images.fingerprint, "holdout": ev.holdout, "validation-fraction": ev.validation_fraction}
    if _split_column(site):  # the CSV's assignment is part of what the split is made from
        key["split-column"] = _split_column(site)
        key["splits-sha256"] = hashlib.sha256(",".join(splits).encode()).hexdigest()
    return key


def stored_split(site: SiteConfig, images, splits: tuple[str, ...] = ()) -> tuple[dict | None, str]:
    """The stored evaluation split while it is still the one for these images and settings, else None and why
    ('' when there is none yet). Reads only: :func:`evaluation_split` makes a new one."""
    path = Path(site.state_dir) / SPLIT_FILE
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc})"
    # a split made from a split column is not kept once the column is gone (splits stored before the column existed
    # carry no such key, and stay)
    if isinstance(stored, dict) and all(stored.get(k) == v for k, v in _split_identity(site, images, splits).items()) \
            and stored.get("split-column", "") == _split_column(site):
        return stored, ""
    return None, "its evaluation images or settings changed"


def held_out_rows(split: dict) -> list[int]:
    """The held-out images' indices in the order the site evaluates them: its validation images, then its test ones."""
    return split["val"] + split["test"]


def evaluation_split(site: SiteConfig, images, splits: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """The site's stored evaluation split (``<state-dir>/evaluation-split.json``), made once.

    With ``holdout``: ``train`` (training indices) and ``val``/``test`` (held-out indices) of the training
    images; with its own evaluation set: ``val``/``test`` indices of those images (rows of the images read, in
    the labels CSV's order, skipped rows left out) — with ``split-column``, as ``splits`` (each image's "val" /
    "test" from that column) says, else stratified at random by ``validation-fraction``. Kept while the images
    are the same (sha256 fingerprint), so held-out images never reach training across runs and resumes;
    when they change, a new split is made and logged.
    """
    import secrets

    from fedtl.evaluation import stratified_split

    ev = site.evaluation
    path = Path(site.state_dir) / SPLIT_FILE
    stored, problem = stored_split(site, images, splits)
    if stored is not None:
        return stored
    if problem:
        log.warning("Site %s: %s; making a new evaluation split.", site.name, problem)
    key = _split_identity(site, images, splits)
    labels = images.labels
    if _split_column(site):
        if len(splits) != len(labels):
            raise DataError(f"Site {site.name}: {len(splits)} split values for {len(labels)} evaluation images; the "
                            f"labels CSV's `{_split_column(site)}` column must name each image's split.")
        split = dict(key, val=[i for i, s in enumerate(splits) if s == "val"],
                     test=[i for i, s in enumerate(splits) if s == "test"])
        write_atomically(path, json.dumps(split).encode())
        return split
    seed = secrets.randbits(63)  # stored below: the split, not the seed, is what must stay fixed
    split: dict = dict(key)
    if ev.holdout:
        held, train = stratified_split(labels, ev.holdout, seed)
        split["train"] = train.tolist()
    else:
        held = np.arange(len(labels))
    val, test = stratified_split(labels[held], ev.validation_fraction, seed + 1)
    split["val"], split["test"] = held[val].tolist(), held[test].tolist()
    write_atomically(path, json.dumps(split).encode())
    return split
