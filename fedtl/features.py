"""The prefix-output cache ("bottleneck features").

The frozen prefix never changes, so its output for a data set is computed once and stored on
disk, keyed by everything that determines it: backbone name and weights hash, preprocessing,
split point and a fingerprint of the data. Any change to any part is a different key, so a
stale entry is never read. Entries are written atomically (temporary file + ``os.replace``);
an unreadable entry is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from typing import TYPE_CHECKING

from fedtl.data.preprocess import VIEW_SHIFTS, Preprocessing  # VIEW_SHIFTS: defined next to the test-time views
from fedtl.data.sources import ImageSet

if TYPE_CHECKING:
    from fedtl.model import TransferModel

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def default_cache_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("FEDTL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedtl" / "features"


@dataclass(frozen=True)
class CacheKey:
    backbone: str
    weights_sha256: str
    preprocessing: dict
    split: str  # name of the prefix's last unit (+ pooled or not)
    data_fingerprint: str

    def parts(self) -> dict:
        return {"format": CACHE_FORMAT, "backbone": self.backbone, "weights_sha256": self.weights_sha256,
                "preprocessing": self.preprocessing, "split": self.split, "data": self.data_fingerprint}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts(), sort_keys=True).encode()).hexdigest()[:40]


# Augmentation multiplicity (``train.views``; De et al., "Unlocking High-Accuracy Differentially Private Image
# Classification through Scale", 2022): view k of a training image is the image translated by VIEW_SHIFTS[k] steps
# of 1/14 of its side (2 px at 28 px), edges repeated. Each view is an ordinary data set to the cache (its own
# fingerprint, so its own entry); view 0 is the image itself. The suffix averages its prediction over an example's
# views (fedtl.model.Suffix), so one example is still one clipped gradient: the privacy accounting is unchanged.


class ShiftedView:
    """View ``k`` of an image set, as the cache sees it: its fingerprint is derived from the base set's and the
    shift (no pass over the shifted pixels), and the shifted images are made only when an entry must be built.
    A site asked for its views on every request finds them at the cost of hashing its images once."""

    def __init__(self, base: ImageSet, k: int):
        self.base, self.shift = base, VIEW_SHIFTS[k]
        self.labels, self.name = base.labels, f"{base.name} (view {k})"

    def __len__(self) -> int:
        return len(self.base)

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"view {self.shift[0]},{self.shift[1]} of {self.base.fingerprint}".encode()).hexdigest()

    @cached_property
    def images(self) -> np.ndarray:
        dy, dx = self.shift
        data = self.base.images
        h, w = data.shape[1:3]
        step = max(1, round(min(h, w) / 14))
        widths = [(0, 0), (step, step), (step, step)] + [(0, 0)] * (data.ndim - 3)
        padded = np.pad(data, widths, mode="edge")
        top, left = step - dy * step, step - dx * step
        return np.ascontiguousarray(padded[:, top:top + h, left:left + w])


def shifted_view(data: ImageSet, k: int) -> ImageSet | ShiftedView:
    """View ``k`` of ``data`` (see VIEW_SHIFTS); view 0 is ``data`` itself."""
    return data if VIEW_SHIFTS[k] == (0, 0) else ShiftedView(data, k)


def view_features(get, data: ImageSet, views: int) -> tuple[torch.Tensor, bool]:
    """Prefix features of ``views`` views of ``data`` through ``get(ImageSet) -> (features, cache hit)``:
    ``(N, D)`` for one view, ``(N, views, D)`` for more; hit when every view came from the cache."""
    return stack_views(lambda k: get(shifted_view(data, k)), views)


def stack_views(get, views: int) -> tuple[torch.Tensor, bool]:
    """Features of views ``0 … views − 1`` through ``get(k) -> (features, cache hit)`` (training views above, or
    test-time views): ``(N, D)`` for one view, ``(N, views, D)`` for more; hit when every view came from the cache."""
    if views <= 1:
        return get(0)
    out, hits = [], True
    for k in range(views):
        feats, hit = get(k)
        out.append(feats)
        hits = hits and hit
    return torch.stack(out, 1), hits


def split_key(split_name: str, pooling: str | None) -> str:
    """A cache key's split part: the prefix's last unit and how its maps were pooled (``model.pooling``; None:
    kept as maps, for a suffix that holds backbone units). ``avg`` keeps the key entries had before poolings
    were selectable, so those entries stay valid."""
    from fedtl.model import concrete_pooling

    if pooling is None:
        return f"{split_name}:map"
    pooling = concrete_pooling(pooling)
    return f"{split_name}:pooled" if pooling == "avg" else f"{split_name}:pooled-{pooling}"


def cache_key(model: TransferModel, pre: Preprocessing, data: ImageSet) -> CacheKey:
    pooling = model.pooling if len(model.suffix.blocks) == 0 else None
    return CacheKey(model.backbone_name, model.weights_sha256, pre.key(), split_key(model.split_name, pooling),
                    data.fingerprint)


class FeatureCache:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def path(self, key: CacheKey) -> Path:
        return self.dir / f"{key.digest()}.safetensors"

    def load(self, key: CacheKey, n: int) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            feats = load_file(path)["features"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("Feature cache entry %s is unreadable (%s); rebuilding it.", path, exc)
            return None
        if feats.shape[0] != n:
            log.warning("Feature cache entry %s holds %d rows, expected %d; rebuilding it.", path, feats.shape[0], n)
            return None
        return feats

    def store(self, key: CacheKey, feats: torch.Tensor) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            save_file({"features": feats.contiguous()}, tmp, metadata={"key": json.dumps(key.parts(), sort_keys=True)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get_or_build(self, model: TransferModel, pre: Preprocessing, data: ImageSet, *, batch_size: int = 64,
                     progress: bool = True) -> tuple[torch.Tensor, bool]:
        """Prefix features for ``data`` and whether they came from the cache."""
        key = cache_key(model, pre, data)
        feats = self.load(key, len(data))
        if feats is not None:
            return feats, True
        feats = compute_prefix_features(model, pre, data, batch_size=batch_size, progress=progress)
        self.store(key, feats)
        return feats, False


def compute_prefix_features(model: TransferModel, pre: Preprocessing, data: ImageSet, *, batch_size: int = 64,
                            progress: bool = False) -> torch.Tensor:
    """Run the frozen prefix over ``data`` once: ``(N, ...)`` float32."""
    from tqdm.auto import tqdm

    out = []
    model.eval()
    show = progress and sys.stderr.isatty()
    name = data.name + (f" (test-time view {pre.view})" if getattr(pre, "view", 0) else "")
    if progress and not show:
        log.info("Computing prefix features for %s (%d images)…", name, len(data))
    bar = tqdm(total=len(data), desc=f"prefix features {name}", unit="img", disable=not show, leave=False)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = pre(data.images[start:start + batch_size])
            out.append(model.prefix_features(x))
            bar.update(x.shape[0])
    bar.close()
    return torch.cat(out) if out else torch.empty(0)
