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
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.config import PrivacyConfig, TrainConfig
from fedtl.errors import PrivacyBudgetError
from fedtl.model import TransferModel
from fedtl.privacy.accounting import calibrate_noise
from fedtl.privacy.engine import make_private, unwrap
from fedtl.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    num_examples: int
    steps: int = 0
    loss: float = float("nan")
    epsilon: float = 0.0  # the site's cumulative ε after this round (0 without DP)
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    seconds: float = 0.0
    declined: bool = False
    reason: str = ""


@dataclass
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float
    auc: float
    probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))


def _optimizer(model: TransferModel, cfg: TrainConfig, lr_scale: float) -> torch.optim.Optimizer:
    groups = model.trainable_param_groups(cfg.lr, lr_scale)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one epoch; with Poisson sampling the sample rate is 1 / this."""
    return max(1, math.ceil(n / max(1, min(batch_size, n))))


def train_suffix(model: TransferModel, feats: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
                 lr_scale: float = 1.0, privacy: PrivacyConfig | None = None, ledger: PrivacyLedger | None = None,
                 run_id: str = "", server_round: int = 1, total_rounds: int = 1) -> TrainResult:
    """Train the suffix for ``cfg.epochs`` local epochs; with ``privacy`` enabled, DP-SGD via Opacus.

    With DP, the site's ledger decides: the noise multiplier is calibrated once per run so that
    the planned rounds fit the site's own budget, a round that would exceed it is declined, and
    the ledger is saved (atomically) before this function returns.
    """
    t0 = time.perf_counter()
    n = int(labels.shape[0])
    if n == 0:
        return TrainResult(0, declined=True, reason="the site has no training examples")
    torch.manual_seed(cfg.seed * 1_000_003 + server_round)
    batch = min(cfg.batch_size, n)
    loader = DataLoader(TensorDataset(feats, labels), batch_size=batch, shuffle=True)
    module: nn.Module = model.suffix
    optimizer = _optimizer(model, cfg, lr_scale)
    engine = None
    result = TrainResult(num_examples=n)
    dp = privacy is not None and privacy.enabled
    model.train()  # the suffix's trainable layers; prefix and BatchNorm stay in eval mode
    if dp:
        if ledger is None:
            raise ValueError("DP training needs the site's privacy ledger")
        per_epoch = steps_per_epoch(n, batch)
        q = 1.0 / per_epoch
        round_steps = per_epoch * cfg.epochs
        sigma = _noise_for_round(ledger, privacy, q, round_steps, run_id, server_round, total_rounds)
        spent = ledger.epsilon()
        after = ledger.epsilon([(sigma, q, round_steps)])
        if after > ledger.target_epsilon + 1e-9:
            result.declined = True
            result.epsilon = spent
            model.eval()
            result.reason = (
                f"Site `{ledger.site}` has spent ε={spent:.2f} of its budget {ledger.target_epsilon}; this round "
                f"would bring it to ε={after:.2f}, so it will not train another round."
            )
            return result
        module, optimizer, loader, engine = make_private(
            module, optimizer, loader, noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm,
            accountant=privacy.accountant, history=ledger.history,
        )
        result.noise_multiplier, result.sample_rate = sigma, q
    try:
        with warnings.catch_warnings():
            # Opacus' backward hooks see inputs (cached features) that need no gradient; torch says so.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses, steps = _run_epochs(module, optimizer, loader, cfg.epochs)
    finally:
        model.eval()
        if engine is not None:
            unwrap(module)
    result.steps = steps
    result.loss = float(np.mean(losses)) if losses else float("nan")
    if dp:
        ledger.record_round(list(engine.accountant.history), run=run_id, round=server_round, steps=steps,
                            noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate)
        ledger.save()  # durable before the update can leave the site
        result.epsilon = ledger.epsilon()
    result.seconds = time.perf_counter() - t0
    return result


def _run_epochs(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int):
    losses, steps = [], 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            if x.shape[0] == 0:  # an empty Poisson batch is still a (noise-only) step
                optimizer.step()
            else:
                loss = F.cross_entropy(module(x), y)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            steps += 1
    return losses, steps


def _noise_for_round(ledger: PrivacyLedger, privacy: PrivacyConfig, q: float, round_steps: int, run_id: str,
                     server_round: int, total_rounds: int) -> float:
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    plan = ledger.plan
    if plan.get("run") == run_id and plan.get("sample_rate") == q and plan.get("round_steps") == round_steps:
        return float(plan["noise_multiplier"])
    remaining = max(1, total_rounds - server_round + 1)
    try:
        sigma = calibrate_noise(ledger.target_epsilon, ledger.delta, q, remaining * round_steps,
                                prior=ledger.history, accountant=ledger.accountant)
    except PrivacyBudgetError:
        # Nothing fits: fall back to a large noise; the budget check declines the round.
        return 1e3
    ledger.plan = {"run": run_id, "sample_rate": q, "round_steps": round_steps, "noise_multiplier": sigma,
                   "planned_rounds": remaining}
    return sigma


@torch.no_grad()
def evaluate_suffix(model: TransferModel, feats: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> EvalResult:
    model.eval()
    logits = torch.cat([model.suffix(feats[i:i + batch_size]) for i in range(0, feats.shape[0], batch_size)])
    loss = float(F.cross_entropy(logits, labels))
    probs = logits.softmax(-1).numpy()
    y = labels.numpy()
    acc = float(accuracy_score(y, probs.argmax(1)))
    auc = float("nan")
    if len(np.unique(y)) > 1:
        auc = float(roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2 else
                    roc_auc_score(y, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))
    return EvalResult(int(y.shape[0]), loss, acc, auc, probs)
