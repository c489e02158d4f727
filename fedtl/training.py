"""Local training and evaluation of the suffix on cached prefix features.

Library functions take typed configs and tensors; they never see Flower objects. The frozen
prefix is not run here at all: its output comes from :mod:`fedtl.features`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.config import TrainConfig
from fedtl.model import TransferModel
from fedtl.privacy.engine import make_private, unwrap
from fedtl.privacy.policy import steps_per_epoch
from fedtl.standardize import FeatureStandardizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one local round did. Stays at the site: only the suffix and the site's ε leave it."""

    num_examples: int
    steps: int = 0
    loss: float = float("nan")  # mean training loss: logged locally, never sent
    history: list[tuple[float, float, int]] = field(default_factory=list)  # the accountant's steps of this round
    seconds: float = 0.0


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson sampling rate; must equal 1 / steps_per_epoch(n, batch_size)
    accountant: str = "rdp"


@dataclass
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float
    auc: float
    probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))


def _optimizer(model: TransferModel, cfg: TrainConfig, lr_scale: float,
               local_head: nn.Module | None = None) -> torch.optim.Optimizer:
    groups = model.trainable_param_groups(cfg.lr, lr_scale)
    if local_head is not None:  # trained at the head's learning rate
        groups.append({"params": [p for p in local_head.parameters() if p.requires_grad], "lr": cfg.lr})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_suffix(model: TransferModel, feats: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
                 lr_scale: float = 1.0, batch_size: int | None = None, epochs: int | None = None,
                 dp: DPSettings | None = None, generator: torch.Generator | None = None,
                 reseed: bool = True, standardize: FeatureStandardizer | None = None,
                 local_head: nn.Module | None = None) -> TrainResult:
    """Train the suffix on cached prefix features; with ``dp``, DP-SGD through Opacus.

    ``batch_size`` / ``epochs`` default to ``cfg``'s (a site's privacy plan may clamp them).
    With DP, Poisson sampling and noise draw from ``generator`` (a secret one unless the caller
    passes a seeded one), re-seeded from the OS before every noise draw when ``reseed``
    (:mod:`fedtl.privacy.rng`). The returned ``history`` is the accountant's record of exactly
    the steps taken; the caller records it in the site's ledger before releasing the update.
    With ``standardize`` (the server's statistics), the head trains in standardized coordinates and is returned in
    raw coordinates (:mod:`fedtl.standardize`).
    ``local_head`` (a copy of the head's architecture; ``personalization.kind = local-head``): trained in the same
    steps on its own cross-entropy over the same head inputs, detached, so the suffix's tensors get exactly the
    gradients they would get without it; with DP one per-sample clip bounds both (:class:`WithLocalHead`).
    """
    if standardize is not None:
        with standardize.training_coordinates(model, *([local_head] if local_head is not None else [])):
            return train_suffix(model, feats, labels, cfg, lr_scale=lr_scale, batch_size=batch_size, epochs=epochs,
                                dp=dp, generator=generator, reseed=reseed, local_head=local_head)
    from fedtl.privacy import rng

    t0 = time.perf_counter()
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no training examples")
    batch = max(1, min(batch_size or cfg.batch_size, n))
    epochs = epochs or cfg.epochs
    generator = generator if generator is not None else rng.secret_generator()
    loader = DataLoader(TensorDataset(feats, labels), batch_size=batch, shuffle=True, generator=generator)
    module: nn.Module = model.suffix if local_head is None else WithLocalHead(model.suffix, local_head)
    optimizer = _optimizer(model, cfg, lr_scale, local_head)
    engine = None
    model.train()  # the suffix's trainable layers; prefix and BatchNorm stay in eval mode
    if local_head is not None:
        local_head.train()
    if dp is not None:
        expected_q = 1.0 / steps_per_epoch(n, batch)
        if not math.isclose(dp.sample_rate, expected_q, rel_tol=1e-12):
            raise ValueError(f"sample rate {dp.sample_rate} does not match {n} examples at batch size {batch}")
        module, optimizer, loader, engine = make_private(
            module, optimizer, loader, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            accountant=dp.accountant, history=[])
        rng.attach(optimizer, loader, generator, reseed=reseed)
    try:
        with warnings.catch_warnings():
            # Opacus' backward hooks see inputs (cached features) that need no gradient; torch says so.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses, steps = _run_epochs(module, optimizer, loader, epochs,
                                        _two_heads_loss if local_head is not None else F.cross_entropy)
    finally:
        model.eval()
        if local_head is not None:
            local_head.eval()
        if engine is not None:
            unwrap(module)
    history = [tuple(h) for h in engine.accountant.history] if engine is not None else []
    if engine is not None and sum(int(h[2]) for h in history) != steps:
        raise RuntimeError(f"the accountant recorded {sum(int(h[2]) for h in history)} steps, training took {steps}")
    return TrainResult(num_examples=n, steps=steps, loss=float(np.mean(losses)) if losses else float("nan"),
                       history=history, seconds=time.perf_counter() - t0)


class WithLocalHead(nn.Module):
    """The suffix and a site's local head side by side (``personalization.kind = local-head``, FedRoD-style): the
    output is the global head's logits, then the local head's, ``(B, 2C)``. The local head reads the shared part's
    output *detached*, so what the site sends is trained by the global head's loss alone; under DP-SGD one clip per
    example bounds the gradient of both, so the local head is a function of the same private steps and costs no ε
    of its own."""

    def __init__(self, suffix: nn.Module, local_head: nn.Module):
        super().__init__()
        self.suffix = suffix
        self.local_head = local_head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = self.suffix.head_input(z)
        return torch.cat([self.suffix.read(self.suffix.head, f), self.suffix.read(self.local_head, f.detach())], -1)


def _two_heads_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    c = logits.shape[-1] // 2
    return F.cross_entropy(logits[:, :c], y) + F.cross_entropy(logits[:, c:], y)


def _run_epochs(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int,
                loss_fn=F.cross_entropy):
    losses, steps = [], 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            if x.shape[0] == 0:  # an empty Poisson batch is still a (noise-only) step
                optimizer.step()
            else:
                loss = loss_fn(module(x), y)
                loss.backward()
                _finite_per_sample(optimizer)
                optimizer.step()
                losses.append(float(loss.detach()))
            steps += 1
    return losses, steps


@torch.no_grad()
def _finite_per_sample(optimizer: torch.optim.Optimizer) -> None:
    """Zero the non-finite entries of every per-sample gradient (DP-SGD only) before Opacus clips them.

    A server chooses the suffix a site trains; with large enough weights one example's logits overflow and its
    gradient is inf / NaN, which clipping turns into NaN and the noisy sum spreads to the whole update, so whether
    the released update is finite would tell whether that example was sampled. Replacing such entries by zero is a
    function of that example alone, so the clipped sum still moves by at most the clipping norm per example
    (tests/unit/privacy/test_dp.py has the attack)."""
    for p in getattr(optimizer, "params", ()):
        samples = getattr(p, "grad_sample", None)
        for g in samples if isinstance(samples, list) else [samples]:
            if isinstance(g, torch.Tensor):
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def evaluate_suffix(model: TransferModel, feats: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> EvalResult:
    """Loss, argmax accuracy and AUC (macro one-vs-rest for more than two classes; NaN with one class)."""
    from fedtl.evaluation import auc_of

    model.eval()
    if feats.shape[0] == 0:
        return EvalResult(0, float("nan"), float("nan"), float("nan"), np.empty((0, 0)))
    logits = torch.cat([model.suffix(feats[i:i + batch_size]) for i in range(0, feats.shape[0], batch_size)])
    loss = float(F.cross_entropy(logits, labels))
    probs = logits.softmax(-1).numpy()
    y = labels.numpy()
    acc = float(np.mean(probs.argmax(1) == y))
    return EvalResult(int(y.shape[0]), loss, acc, auc_of(probs, y), probs)
