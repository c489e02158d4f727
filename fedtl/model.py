"""TransferModel: a frozen pretrained prefix and a small trainable suffix.

    image (B, 3, R, R) ─► prefix (frozen units, eval mode) ─► z ─► suffix ─► logits (B, C)

``z`` is the prefix output ("bottleneck feature"): ``(B, C', h, w)`` when the suffix keeps
backbone units, or the pooled ``(B, D)`` when the suffix is the head alone (:class:`SpatialPool`,
``model.pooling``). Only tensors that require grad (all in the suffix) are trained, exchanged and
aggregated.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedtl.adapters import apply_lora, apply_unfreeze
from fedtl.backbones import Backbone
from fedtl.config import AdaptersConfig, ModelConfig
from fedtl.errors import ConfigError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


class SpatialPool(nn.Module):
    """Feature maps ``(B, C, h, w)`` → ``(B, D)``: ``avg``, the mean over positions (D = C); ``avg-std``, also
    their standard deviation over positions (2C); ``avg-std-grid``, also the means of the four quadrants, which
    overlap by a row / column when a side is odd, as ``adaptive_avg_pool2d(·, 2)``'s do (6C). Under DP the
    richer poolings need standardized training (``train.standardize``; docs/benchmarks.md)."""

    WIDTH = {"avg": 1, "avg-std": 2, "avg-std-grid": 6}

    def __init__(self, kind: str = "avg"):
        super().__init__()
        kind = concrete_pooling(kind)
        if kind not in self.WIDTH:
            raise ConfigError(f"`model.pooling` must be one of {', '.join(self.WIDTH)}, got {kind!r}.")
        self.kind = kind

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        parts = [m.mean((2, 3))]
        if self.kind != "avg":
            parts.append(torch.sqrt(m.var((2, 3), unbiased=False) + 1e-6))  # + ε: a finite gradient on flat maps
        if self.kind == "avg-std-grid":
            h, w = m.shape[2:]
            rows = (slice(0, (h + 1) // 2), slice(h // 2, h))
            cols = (slice(0, (w + 1) // 2), slice(w // 2, w))
            parts += [m[:, :, r, c].mean((2, 3)) for r in rows for c in cols]
        return torch.cat(parts, 1)


def concrete_pooling(kind: str) -> str:
    """``model.pooling`` as a model uses it: ``auto`` that nobody resolved (``FedTLConfig.resolved``, which the server
    does and sends to its sites) is the spatial mean."""
    return "avg" if kind == "auto" else kind


def concrete_head(kind: str) -> str:
    """``model.head`` as a model uses it: ``auto`` that nobody resolved (``FedTLConfig.resolved``, which the server
    does from its data's declared labels and sends to its sites) is the linear head."""
    return "linear" if kind == "auto" else kind


class CumulativeLink(nn.Module):
    """Ordered classes from one score (``model.head = ordinal``): the proportional-odds model
    ``P(y ≤ j) = σ(θ_j − s)``, j = 0 … C−2, with cut points ``θ`` kept increasing (the first, then softplus gaps).
    Input ``(…, 1)`` scores, output ``(…, C)`` log class probabilities: a valid logit vector, so cross-entropy,
    ``softmax``, the decision rule and the exports read it as they read a linear head's logits. One weight vector
    instead of C: under DP the clipped gradient is not spread over C − 1 directions (docs/benchmarks.md, RetinaMNIST).
    With two classes it is logistic regression on one logit."""

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"`model.head = ordinal` needs at least 2 classes, got {num_classes}.")
        # start from a uniform prediction: θ_j = logit((j + 1) / C)
        theta = torch.logit(torch.arange(1, num_classes, dtype=torch.float64) / num_classes)
        gaps = torch.diff(theta)
        raw = torch.cat([theta[:1], gaps + torch.log(-torch.expm1(-gaps))])  # softplus⁻¹ of the gaps
        self.cuts = nn.Parameter(raw.float())

    def thresholds(self) -> torch.Tensor:
        return torch.cat([self.cuts[:1], self.cuts[:1] + torch.cumsum(F.softplus(self.cuts[1:]), 0)])

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        theta = self.thresholds()
        below = theta - s  # (…, C−1): log-odds of y ≤ j
        first = F.logsigmoid(below[..., :1])
        last = F.logsigmoid(-below[..., -1:])
        # log(σ(a) − σ(b)), a > b: log σ(a) + log σ(−b) + log(1 − e^(b − a)); the gap a − b = θ_j − θ_{j−1} > 0
        gap = (theta[1:] - theta[:-1]).clamp_min(1e-6)
        middle = F.logsigmoid(below[..., 1:]) + F.logsigmoid(-below[..., :-1]) + torch.log(-torch.expm1(-gap))
        return torch.cat([first, middle, last], -1)


class Suffix(nn.Module):
    def __init__(self, blocks: nn.Sequential, feature_dim: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        self.blocks = blocks  # trailing backbone units (may be empty)
        self.pool = SpatialPool(cfg.pooling)
        norm = [nn.LayerNorm(feature_dim, elementwise_affine=False)] if cfg.feature_norm == "layernorm" else []
        head = concrete_head(cfg.head)
        if head == "linear":
            self.head = nn.Sequential(*norm, nn.Linear(feature_dim, num_classes))
        elif head == "ordinal":
            self.head = nn.Sequential(*norm, nn.Linear(feature_dim, 1), CumulativeLink(num_classes))
        elif head == "mlp":
            self.head = nn.Sequential(*norm, nn.Linear(feature_dim, cfg.head_hidden), nn.ReLU(),
                                      nn.Linear(cfg.head_hidden, num_classes))
        else:
            raise ConfigError(f"`model.head` must be one of linear, mlp, ordinal, got {cfg.head!r}.")
        last = [m for m in self.head if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)  # start from a uniform prediction
        nn.init.zeros_(last.bias)

    def head_input(self, z: torch.Tensor) -> torch.Tensor:
        """What a head reads: the pooled blocks' output ``(B, D)``, or the cached features themselves."""
        return self.pool(self.blocks(z)) if len(self.blocks) else z  # (B, C', h, w) -> (B, D)

    @staticmethod
    def read(head: nn.Module, f: torch.Tensor) -> torch.Tensor:
        """``head``'s logits for head inputs ``f``: ``(B, D)`` → ``(B, C)``; ``(B, K, D)``, K views of each example
        (``train.views``) → the log of the mean probability, a valid logit vector (cross-entropy of the mixture)."""
        if f.ndim == 3:
            logp = torch.log_softmax(head(f), dim=-1)
            return torch.logsumexp(logp, dim=1) - math.log(f.shape[1])
        return head(f)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.read(self.head, self.head_input(z))


class _TrainableSuffix:
    """What a site and the server do with the trainable tensors; shared by both model classes below."""

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state(self) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((n, p.detach().clone()) for n, p in self.named_parameters() if p.requires_grad)

    def expected_state(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return expected_of(self, trainable_only=True)

    def load_trainable_state(self, state: dict[str, torch.Tensor | np.ndarray]) -> None:
        problems = check_state(state, self.expected_state())
        if problems:
            from fedtl.errors import UpdateRejected

            raise UpdateRejected("; ".join(problems))
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value))

    def trainable_param_groups(self, lr: float, lr_scale: float) -> list[dict]:
        adapter_ids = {id(p) for p in self.adapter_params}
        head = [p for p in self.suffix.head.parameters() if p.requires_grad]
        adapters = [p for p in self.parameters() if p.requires_grad and id(p) in adapter_ids]
        groups = [{"params": head, "lr": lr}]
        if adapters:
            groups.append({"params": adapters, "lr": lr * lr_scale})
        return groups

    def param_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in self.parameters())
        return {"trainable_params": trainable, "total_params": total, "full_model_bytes": nbytes}


class TransferModel(_TrainableSuffix, nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, model_cfg: ModelConfig, adapters_cfg: AdaptersConfig,
                 seed: int = 0):
        super().__init__()
        units = copy.deepcopy(truncate_units(backbone, model_cfg.cut_after))  # never mutate the shared backbone
        k = adapters_cfg.blocks if adapters_cfg.kind != "none" else 0
        if k >= len(units):
            raise ConfigError(
                f"`adapters.blocks` must be < {len(units)} (the number of units in {backbone.spec.name}), got {k}."
            )
        self.backbone_name = backbone.spec.name
        self.weights_sha256 = backbone.weights_sha256
        self.split_index = len(units) - k
        self.split_name = units[self.split_index - 1][0]  # last unit of the prefix
        self.prefix = nn.Sequential(OrderedDict(units[: self.split_index]))
        self.pooling = concrete_pooling(model_cfg.pooling)
        self.prefix_pool = SpatialPool(self.pooling) if k == 0 else nn.Identity()
        for p in self.prefix.parameters():
            p.requires_grad_(False)
        blocks = nn.Sequential(OrderedDict(units[self.split_index:]))
        for p in blocks.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)
        if adapters_cfg.kind == "lora":
            self.adapter_params = apply_lora(blocks, adapters_cfg)
        elif adapters_cfg.kind == "unfreeze":
            self.adapter_params = apply_unfreeze(blocks)
        else:
            self.adapter_params = []
        self.cut_after = units[-1][0]
        channels = backbone.spec.feature_dim if len(units) == len(backbone.units) else _output_channels(units)
        self.suffix = Suffix(blocks, channels * SpatialPool.WIDTH[self.pooling], num_classes, model_cfg)
        self.num_classes = num_classes
        self.eval()

    # ---- modes -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TransferModel:
        """Train only what trains: the prefix and every BatchNorm stay in eval mode."""
        super().train(mode)
        self.prefix.eval()
        for m in self.suffix.modules():
            if isinstance(m, _BN):
                m.eval()
        return self

    # ---- forward -----------------------------------------------------------------------
    @torch.no_grad()
    def prefix_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) → prefix output; never tracks gradients."""
        self.prefix.eval()
        return self.prefix_pool(self.prefix(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix_features(x))


class SuffixModel(_TrainableSuffix, nn.Module):
    """The trainable suffix alone, for a site whose prefix features are cached and whose suffix is the head.

    Same parameter names, shapes and training behaviour as :class:`TransferModel` with ``adapters.kind =
    "none"`` (``suffix.head.…``), built without the backbone: the feature width comes from the cached
    features, the backbone's name, weights hash and split point from the cache entry that matched them.
    """

    def __init__(self, backbone_name: str, weights_sha256: str, split_name: str, feature_dim: int, num_classes: int,
                 model_cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.backbone_name, self.weights_sha256 = backbone_name, weights_sha256
        self.split_name = self.cut_after = split_name
        self.pooling = concrete_pooling(model_cfg.pooling)
        self.adapter_params: list[nn.Parameter] = []
        torch.manual_seed(seed)
        self.suffix = Suffix(nn.Sequential(), feature_dim, num_classes, model_cfg)
        self.num_classes = num_classes
        self.eval()


def truncate_units(backbone: Backbone, cut_after: str) -> list[tuple[str, nn.Module]]:
    """The backbone's units up to and including ``cut_after`` ("" = all, "auto" = the spec's recommendation)."""
    cut = backbone.spec.recommended_cut if cut_after == "auto" else cut_after
    if not cut:
        return list(backbone.units)
    names = [n for n, _ in backbone.units]
    if cut not in names:
        raise ConfigError(
            f"`model.cut-after` must name a unit of {backbone.spec.name} (or be empty for the whole network, "
            f"'auto' for its recommendation), got {cut!r}. Units: {', '.join(names)}."
        )
    return list(backbone.units[: names.index(cut) + 1])


@torch.no_grad()
def _output_channels(units: list[tuple[str, nn.Module]]) -> int:
    x = torch.zeros(1, 3, 64, 64)
    for _, unit in units:
        was = unit.training
        unit.eval()
        x = unit(x)
        unit.train(was)
    return int(x.shape[1])


def expected_of(module: nn.Module, trainable_only: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of ``module``'s parameters (those that require grad with ``trainable_only``), as
    :func:`check_state` compares a state against."""
    return {n: (tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in module.named_parameters()
            if p.requires_grad or not trainable_only}


def check_state(state: dict, expected: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Every problem with a suffix state against the expected names, shapes and dtypes."""
    problems = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {', '.join(f'`{m}`' for m in missing[:5])}" + (" …" if len(missing) > 5 else ""))
    if extra:
        problems.append(f"unexpected tensors {', '.join(f'`{m}`' for m in extra[:5])}" + (" …" if len(extra) > 5 else ""))
    for name, value in state.items():
        if name not in expected:
            continue
        shape, dtype = expected[name]
        arr = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        if tuple(arr.shape) != shape:
            problems.append(f"`{name}` has shape {tuple(arr.shape)}, expected {shape}")
        elif str(arr.dtype) != dtype:
            problems.append(f"`{name}` has dtype {arr.dtype}, expected {dtype}")
        elif not np.isfinite(arr).all():
            problems.append(f"`{name}` contains NaN or infinite values")
    return problems


def build_model(backbone: Backbone, num_classes: int, model_cfg: ModelConfig, adapters_cfg: AdaptersConfig,
                seed: int = 0) -> TransferModel:
    return TransferModel(backbone, num_classes, model_cfg, adapters_cfg, seed=seed)
