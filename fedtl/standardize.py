"""Standardized coordinates for training the head under DP (``train.standardize``).

DP-SGD clips each example's gradient to a fixed norm and adds the same noise to every coordinate, so the
coordinates the head is trained in matter even though the model it can express does not change. Pooled prefix
features share a large common offset and have very unequal scales (the mean + std pooling: mean norm 25.6
and 51.2, a per-dimension spread of 0.68 around an offset of 4.76): clipped per-example gradients then point
mostly along the offset, and the noise drowns the rest. The head is therefore trained on

    u = gain · (x − mean) / std        (per dimension)

with ``mean`` and ``std`` computed by the *server* on its own validation data and sent with each train request.
For a site they are a fixed preprocessing that does not depend on its data, so its DP guarantee is unchanged
(whatever values a server sends: a hostile server can make training worse, as it can with any suffix it sends,
never leak more). The model stays in raw coordinates: while it trains, the site rewrites the head's first linear
layer into u-coordinates (``W' = W · std / gain``, ``b' = b + W · mean``) and standardizes that layer's input, so
the model computes the same function, only its head is parametrized differently; after training it writes the
head back. What is sent, aggregated, checkpointed, exported and used for prediction is the ordinary head on the
pooled features.

``x`` is whatever the head reads: the cached pooled prefix features for the head-only suffix, and with adapters the
pooled output of the trainable blocks — its statistics are then taken from the suffix as the server starts it
(LoRA starts as the identity, so these are the frozen blocks' features). Measured: docs/benchmarks.md, "Richer
pooling with standardized training" and "DP LoRA on the cut network".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

MAX_FEATURES = 1 << 16  # longest statistics vector a site accepts
MIN_STD_FRACTION = 1e-3  # a dimension's std is floored at this fraction of the mean std (constant dimensions)
SCALE_RANGE = (1e-6, 1e6)  # scales a site accepts (and a server sends): the rewritten head stays finite
MAX_MEAN = 1e6  # largest |mean| a site accepts
KEYS = ("feature-mean", "feature-scale")  # in a train / personalize request's config


@dataclass(frozen=True)
class FeatureStandardizer:
    """``u = (x − mean) / scale`` per dimension (``scale = std / gain``)."""

    mean: torch.Tensor  # (D,) float64
    scale: torch.Tensor  # (D,) float64, > 0

    @classmethod
    def from_reference(cls, feats: torch.Tensor, gain: float) -> FeatureStandardizer:
        """From reference features ``(N, D)`` (the server's validation split), ``N`` ≥ 2."""
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"reference features must be (N >= 2, D), got {tuple(feats.shape)}")
        x = feats.double()
        std = x.std(0)
        std = std.clamp_min(max(float(std.mean()) * MIN_STD_FRACTION, 1e-12))
        return cls(x.mean(0).clamp(-MAX_MEAN, MAX_MEAN), (std / gain).clamp(*SCALE_RANGE))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_config(self) -> dict[str, list[float]]:
        return {KEYS[0]: [float(v) for v in self.mean], KEYS[1]: [float(v) for v in self.scale]}

    @classmethod
    def from_config(cls, config: Mapping) -> FeatureStandardizer | None:
        """The statistics in a server's request (None when it sends none); ValueError naming what is wrong."""
        present = [k for k in KEYS if k in config]
        if not present:
            return None
        if len(present) != len(KEYS):
            raise ValueError(f"`{KEYS[0]}` and `{KEYS[1]}` must be sent together")
        vectors = []
        for key in KEYS:
            value = config[key]
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_FEATURES:
                raise ValueError(f"`{key}` must be a list of 1 to {MAX_FEATURES} numbers")
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
                raise ValueError(f"`{key}` must hold finite numbers only")
            vectors.append(torch.tensor(value, dtype=torch.float64))
        mean, scale = vectors
        if mean.shape != scale.shape:
            raise ValueError(f"`{KEYS[0]}` has {mean.shape[0]} values, `{KEYS[1]}` {scale.shape[0]}")
        low, high = SCALE_RANGE
        if not bool(((scale >= low) & (scale <= high)).all()):
            raise ValueError(f"`{KEYS[1]}` must be in [{low:g}, {high:g}] everywhere")
        if not bool((mean.abs() <= MAX_MEAN).all()):
            raise ValueError(f"`{KEYS[0]}` must be in [-{MAX_MEAN:g}, {MAX_MEAN:g}] everywhere")
        return cls(mean, scale)

    def transform(self, feats: torch.Tensor) -> torch.Tensor:
        """``(…, D)`` raw features → standardized, in the features' dtype (no float64 copy of a site's features)."""
        return (feats - self.mean.to(feats.dtype)) / self.scale.to(feats.dtype)

    def _rewritten(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        return (w * self.scale).to(layer.weight.dtype), (b + w @ self.mean).to(layer.bias.dtype)

    def problem(self, model: nn.Module) -> str:
        """Why these statistics cannot train ``model``'s head ('' if they can): no leading linear layer, another
        width, or a head that does not stay finite in standardized coordinates. Depends on the server's values only."""
        try:
            layer = first_linear(model)
        except ValueError as exc:
            return str(exc)
        if layer.in_features != self.dim:
            return f"the statistics have {self.dim} dimensions, the head takes {layer.in_features}"
        if not all(bool(torch.isfinite(t).all()) for t in self._rewritten(layer)):
            return "the head does not stay finite in the statistics' coordinates"
        return ""

    @contextmanager
    def training_coordinates(self, model: nn.Module, *heads: nn.Module) -> Iterator[None]:
        """For the block, parametrize ``model``'s head (and each of ``heads``, a site's local head of the same
        architecture) in standardized coordinates: its first linear layer is rewritten and its input standardized
        (a forward pre-hook), so ``model`` computes the same function on the same raw inputs; after the block (also
        on error) the layer is written back and the hook removed."""
        problem = self.problem(model)
        if problem:
            raise ValueError(problem)
        layers = [first_linear(model), *(_first_linear(h) for h in heads)]
        if any(layer.in_features != self.dim for layer in layers):
            raise ValueError(f"a local head does not take the statistics' {self.dim} dimensions")
        hooks = []
        with torch.no_grad():
            for layer in layers:
                w, b = self._rewritten(layer)
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(lambda _module, args: (self.transform(args[0]), *args[1:])))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for layer in layers:
                    w = layer.weight.double() / self.scale
                    layer.weight.copy_(w)
                    layer.bias.copy_(layer.bias.double() - w @ self.mean)


def server_standardizer(cfg, val_features: torch.Tensor | None, model: nn.Module | None = None
                        ) -> FeatureStandardizer | None:
    """What a server sends (``cfg``: a :class:`~fedtl.config.FedTLConfig`): the statistics of what the head reads
    on its validation data when the run standardizes (``FedTLConfig.standardizes``) and it has two or more
    examples; else None. ``val_features``: cached pooled features ``(N, D)`` / ``(N, views, D)`` (the first view is
    the image itself), or with adapters feature maps ``(N, C, H, W)``, which ``model``'s suffix pools."""
    if not cfg.standardizes or val_features is None or val_features.shape[0] < 2:
        return None
    if val_features.ndim == 4:
        if model is None:
            raise ValueError("feature maps need the model whose suffix pools them")
        feats = head_inputs(model, val_features)
    else:
        feats = val_features[:, 0] if val_features.ndim == 3 else val_features
    return FeatureStandardizer.from_reference(feats, cfg.train.standardize_gain)


@torch.no_grad()
def head_inputs(model: nn.Module, maps: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """What ``model``'s head reads for feature maps ``(N, C, H, W)``: the pooled output of its suffix's blocks."""
    suffix = model.suffix
    return torch.cat([suffix.pool(suffix.blocks(maps[i:i + batch])) for i in range(0, maps.shape[0], batch)])


def first_linear(model: nn.Module) -> nn.Linear:
    """The head's first linear layer: the one that reads the pooled features."""
    return _first_linear(model.suffix.head)


def _first_linear(head: nn.Module) -> nn.Linear:
    for m in head:
        if isinstance(m, nn.Linear):
            return m
        if not isinstance(m, nn.Identity):
            raise ValueError(f"standardized training needs the head to start with a linear layer, not {type(m).__name__}")
    raise ValueError("the head has no linear layer")
