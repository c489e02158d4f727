"""The backbone registry: named pretrained networks, each with a spec and a builder.

A builder returns a :class:`Backbone`: the network cut into an ordered list of *units*
(stem, every block, the final feature convolution) so that a split point is simply an index.
Weights are never hand-copied architectures: timm and torchvision build the networks.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fedtl.errors import BackboneError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # "timm" or "torchvision"
    architecture: str  # the library's own model name
    input_size: int  # the resolution the weights were trained at
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int  # width of the pooled features
    weights_file: str  # file name in the torch.hub cache ($TORCH_HOME/hub/checkpoints)
    weights_source: str  # where the file comes from when it is not cached
    weights_sha256: str | None = None  # full hash when known; else only the name's prefix is known
    description: str = ""
    recommended_cut: str = ""  # unit after which transfer to small grayscale images works best ("" = whole network)


@dataclass
class Backbone:
    """A pretrained network cut into units. ``units[i]`` maps the output of ``units[i-1]``."""

    spec: BackboneSpec
    units: list[tuple[str, nn.Module]]
    classifier: nn.Module | None  # the original ImageNet head (for checks), not used in training
    weights_sha256: str  # hash of the weights file actually loaded
    weights_path: str = ""
    extra: dict = field(default_factory=dict)

    def features(self) -> nn.Sequential:
        from collections import OrderedDict

        return nn.Sequential(OrderedDict(self.units))


_REGISTRY: dict[str, tuple[BackboneSpec, Callable[[BackboneSpec], Backbone]]] = {}


def register(spec: BackboneSpec, builder: Callable[[BackboneSpec], Backbone]) -> None:
    _REGISTRY[spec.name] = (spec, builder)


def available() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"; did you mean `{close[0]}`?" if close else "."
        raise BackboneError(f"Unknown backbone `{name}`{hint} Available: {', '.join(available())}.")
    return _REGISTRY[name][0]


def build_backbone(name: str) -> Backbone:
    """Build a registered backbone with its pretrained weights (hash-checked).

    Builds are memoized per process; callers must not modify the returned modules
    (:class:`fedtl.model.TransferModel` deep-copies the units it uses).
    """
    get_spec(name)  # an unknown name fails here, with the close-match suggestion
    return _build_cached(name, os.environ.get("TORCH_HOME", ""), os.environ.get("FEDTL_WEIGHTS_DIR", ""))


@functools.lru_cache(maxsize=4)
def _build_cached(name: str, torch_home: str, weights_dir: str) -> Backbone:
    return _REGISTRY[name][1](_REGISTRY[name][0])


def weights_candidates(spec: BackboneSpec) -> list[Path]:
    """Where a backbone's weights file is looked for, in order: ``$FEDTL_WEIGHTS_DIR`` (a data
    site's own verified copy, e.g. received from the server) and torch.hub's cache."""
    out = []
    if os.environ.get("FEDTL_WEIGHTS_DIR"):
        out.append(Path(os.environ["FEDTL_WEIGHTS_DIR"]) / spec.weights_file)
    out.append(hub_checkpoint_dir() / spec.weights_file)
    return out


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _ensure_loaded() -> None:
    # Importing the modules registers their backbones.
    from fedtl.backbones import efficientnet, torchvision_models  # noqa: F401
