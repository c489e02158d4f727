"""What a site does with a train message: its data, its cached prefix features, DP training.

Used by the ClientApp (``clients/app.py``); takes a typed config, never Flower objects.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtl.backbones import build_backbone
from fedtl.config import FedTLConfig
from fedtl.data import ImageSet, Preprocessing, load_medmnist, partition_indices, resolve_data_path
from fedtl.features import FeatureCache, default_cache_dir
from fedtl.model import TransferModel
from fedtl.privacy import PrivacyLedger
from fedtl.training import TrainResult, train_suffix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SitePolicy:
    """Who a site is and what it may spend: its name, its ledger file and its own budget."""

    name: str
    ledger_path: Path
    target_epsilon: float
    delta: float


@dataclass
class SiteData:
    name: str
    features: torch.Tensor  # prefix output, (N, ...)
    labels: torch.Tensor  # (N,) int64
    cache_hit: bool


@functools.lru_cache(maxsize=2)
def load_source(path: str):
    return load_medmnist(resolve_data_path(path))


@functools.lru_cache(maxsize=8)
def _partitions(path: str, sites: int, kind: str, alpha: float, classes_per_site: int, seed: int) -> tuple[np.ndarray, ...]:
    labels = load_source(path).train.labels
    return tuple(partition_indices(labels, sites, kind, alpha=alpha, classes_per_site=classes_per_site, seed=seed))


def site_indices(cfg: FedTLConfig, site: int, num_sites: int) -> np.ndarray:
    d = cfg.data
    return _partitions(d.path, num_sites, d.partitioner, d.alpha, d.classes_per_site, d.seed)[site]


def build_transfer_model(cfg: FedTLConfig, num_classes: int) -> TransferModel:
    return TransferModel(build_backbone(cfg.model.backbone), num_classes, cfg.model, cfg.adapters, seed=cfg.train.seed)


def preprocessing_for(cfg: FedTLConfig) -> Preprocessing:
    from fedtl.backbones import get_spec

    return Preprocessing.for_backbone(get_spec(cfg.model.backbone), cfg.model.resolution)


_FEATURE_MEMO: dict[str, tuple[torch.Tensor, bool]] = {}


def cached_features(cfg: FedTLConfig, model: TransferModel, data: ImageSet, progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Prefix features of ``data`` from the on-disk cache (built once), memoized in this process."""
    from fedtl.features import cache_key

    pre = preprocessing_for(cfg)
    digest = cache_key(model, pre, data).digest()
    if digest not in _FEATURE_MEMO:
        if len(_FEATURE_MEMO) > 8:
            _FEATURE_MEMO.clear()
        _FEATURE_MEMO[digest] = FeatureCache(default_cache_dir(cfg.data.cache_dir)).get_or_build(model, pre, data, progress=progress)
    return _FEATURE_MEMO[digest]


def simulated_site_data(cfg: FedTLConfig, model: TransferModel, site: int, num_sites: int) -> SiteData:
    """A simulated site's share of the training split, as cached prefix features.

    The cache entry covers the whole source split (computed once per machine); the site takes
    its rows, which equals computing its own images' features.
    """
    source = load_source(cfg.data.path)
    feats, hit = cached_features(cfg, model, source.train)
    idx = torch.as_tensor(site_indices(cfg, site, num_sites))
    return SiteData(f"site-{site}", feats[idx], torch.as_tensor(source.train.labels)[idx], hit)


def ledger_path(cfg: FedTLConfig, site_name: str) -> Path:
    base = Path(cfg.output.state_dir) if cfg.output.state_dir else Path(cfg.output.dir or ".") / "sites"
    return base / site_name / "privacy-ledger.json"


def simulated_policy(cfg: FedTLConfig, site_index: int) -> SitePolicy:
    name = f"site-{site_index}"
    return SitePolicy(name, ledger_path(cfg, name), cfg.privacy.budget_for(site_index), cfg.privacy.delta)


def train_site(cfg: FedTLConfig, model: TransferModel, data: SiteData, policy: SitePolicy, *, run_id: str,
               server_round: int, total_rounds: int) -> TrainResult:
    """One local round: DP-SGD (or plain SGD) on the suffix, the ledger saved before returning."""
    ledger = None
    if cfg.privacy.enabled:
        ledger = PrivacyLedger.open(policy.ledger_path, site=policy.name, target_epsilon=policy.target_epsilon,
                                    delta=policy.delta, accountant=cfg.privacy.accountant)
    return train_suffix(model, data.features, data.labels, cfg.train, lr_scale=cfg.adapters.effective_lr_scale(),
                        privacy=cfg.privacy, ledger=ledger, run_id=run_id, server_round=server_round,
                        total_rounds=total_rounds)
