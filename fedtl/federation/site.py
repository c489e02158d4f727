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
from fedtl.federation.local_head import local_head_for_round, save_local_head, train_local_head
from fedtl.model import TransferModel
from fedtl.errors import LedgerError
from fedtl.privacy import PrivacyPolicy, Proposal, open_ledger, plan_round
from fedtl.privacy.policy import Decline, policy_for_simulation
from fedtl.privacy.rng import secret_generator, seeded_generator
from fedtl.standardize import FeatureStandardizer
from fedtl.training import DPSettings, TrainResult, train_suffix

log = logging.getLogger(__name__)


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


def cached_features(cfg: FedTLConfig, model: TransferModel, data: ImageSet, progress: bool = True,
                    view: int = 0) -> tuple[torch.Tensor, bool]:
    """Prefix features of ``data`` (its test-time ``view``: :func:`fedtl.data.preprocess.shift_view`) from the on-disk
    cache (built once), memoized in this process."""
    from dataclasses import replace

    from fedtl.features import cache_key

    pre = replace(preprocessing_for(cfg), view=view)
    digest = cache_key(model, pre, data).digest()
    if digest not in _FEATURE_MEMO:
        if len(_FEATURE_MEMO) > 16:  # train (up to 8 views), validation and test of two configurations
            _FEATURE_MEMO.clear()
        _FEATURE_MEMO[digest] = FeatureCache(default_cache_dir(cfg.data.cache_dir)).get_or_build(model, pre, data, progress=progress)
    return _FEATURE_MEMO[digest]


def train_features(cfg: FedTLConfig, model: TransferModel, data: ImageSet | None = None,
                   progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Prefix features of training images (``data``, by default the source's training split), one entry per view
    (``FedTLConfig.train_views``): ``(N, D)`` or ``(N, K, D)``."""
    from fedtl.features import view_features

    images = data if data is not None else load_source(cfg.data.path).train
    return view_features(lambda d: cached_features(cfg, model, d, progress), images, cfg.train_views)


def simulated_site_data(cfg: FedTLConfig, model: TransferModel, site: int, num_sites: int) -> SiteData:
    """A simulated site's share of the training split, as cached prefix features.

    The cache entry covers the whole source split (computed once per machine); the site takes
    its rows, which equals computing its own images' features.
    """
    source = load_source(cfg.data.path)
    feats, hit = train_features(cfg, model)
    idx = torch.as_tensor(site_indices(cfg, site, num_sites))
    return SiteData(f"site-{site}", feats[idx], torch.as_tensor(source.train.labels)[idx], hit)


@dataclass
class SiteEvalData:
    """A site's evaluation splits as prefix features: ``{"val": (features, labels), "test": (…)}``."""

    name: str
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]


def share_like(site_labels: list[np.ndarray], labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Split ``labels``' indices across sites so that each site's share of every class follows its share
    of that class in ``site_labels`` (its training data): each site is evaluated on data drawn like its own."""
    num_classes = int(max([labels.max(initial=0), *(s.max(initial=0) for s in site_labels)])) + 1
    counts = np.stack([np.bincount(s, minlength=num_classes) for s in site_labels]).astype(float)  # (sites, classes)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in site_labels]
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        share = counts[:, c] / counts[:, c].sum() if counts[:, c].sum() else np.full(len(site_labels), 1 / len(site_labels))
        cuts = np.round(np.cumsum(share) * len(idx)).astype(int)
        for site, (a, b) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            out[site].extend(idx[a:b].tolist())
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


@functools.lru_cache(maxsize=8)
def _eval_partitions(path: str, sites: int, kind: str, alpha: float, classes_per_site: int, seed: int,
                     split: str) -> tuple[np.ndarray, ...]:
    source = load_source(path)
    train = source.train.labels
    parts = _partitions(path, sites, kind, alpha, classes_per_site, seed)
    return tuple(share_like([train[p] for p in parts], source.split(split).labels, seed + 1))


def eval_features(cfg: FedTLConfig, model: TransferModel, data: ImageSet, progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Prefix features of evaluation images, one entry per test-time view (``FedTLConfig.eval_views``): ``(N, D)`` or
    ``(N, K, D)``; the suffix scores the mean probability over the views, as ``fedtl predict`` and exports do."""
    from fedtl.features import stack_views

    return stack_views(lambda k: cached_features(cfg, model, data, progress, view=k), cfg.eval_views)


def simulated_eval_data(cfg: FedTLConfig, model: TransferModel, site: int, num_sites: int) -> SiteEvalData:
    """A simulated site's evaluation data: shares of the source's validation and test splits with the
    class mix of its training partition (cached prefix features, like its training data)."""
    source = load_source(cfg.data.path)
    d = cfg.data
    splits = {}
    for split in ("val", "test"):
        feats, _ = eval_features(cfg, model, source.split(split), progress=False)
        idx = _eval_partitions(d.path, num_sites, d.partitioner, d.alpha, d.classes_per_site, d.seed, split)[site]
        t = torch.as_tensor(idx)
        splits[split] = (feats[t], torch.as_tensor(source.split(split).labels)[t])
    return SiteEvalData(f"site-{site}", splits)


def evaluate_site(model: TransferModel, data: SiteEvalData, release_scores: bool = True) -> dict[str, dict]:
    """Figures of the loaded suffix on each of the site's evaluation splits (what :func:`eval_reply` sends): n, AUC,
    argmax accuracy, loss and, with ``release_scores`` (the site's ``evaluation.release-scores``), the score
    histograms (binary) or prediction rows (multi-class) the federation's decision rule is chosen on."""
    from fedtl.evaluation import prediction_rows, score_histograms
    from fedtl.training import evaluate_suffix

    out = {}
    for split, (feats, labels) in data.splits.items():
        if len(labels) == 0:
            out[split] = {"n": 0}
            continue
        r = evaluate_suffix(model, feats, labels)
        fig = {"n": r.num_examples, "auc": r.auc, "acc": r.accuracy, "loss": r.loss}
        if release_scores and r.probabilities.shape[1] == 2:
            fig["hist_neg"], fig["hist_pos"] = score_histograms(r.probabilities[:, 1], labels.numpy())
        elif release_scores:
            fig["preds"] = prediction_rows(r.probabilities, labels.numpy())
        out[split] = fig
    return out


def ledger_path(cfg: FedTLConfig, site_name: str) -> Path:
    base = Path(cfg.output.state_dir) if cfg.output.state_dir else Path(cfg.output.dir or ".") / "sites"
    return base / site_name / "privacy-ledger.json"


def simulated_policy(cfg: FedTLConfig, site_index: int) -> PrivacyPolicy:
    """A simulated site's policy: from the simulation's config (one trust domain), same code path."""
    name = f"site-{site_index}"
    return policy_for_simulation(cfg.privacy, name, site_index, ledger_path(cfg, name), seed=cfg.train.seed)


@dataclass
class SiteRound:
    """The outcome of one train request at a site: what may leave it, and what stays."""

    site: str
    num_examples: int
    declined: bool = False
    reason: str = ""  # sent to the server: never a local path
    epsilon: float = 0.0  # the site's cumulative ε after this round (0 without DP)
    delta: float = 0.0
    accountant: str = ""
    budget: float = 0.0
    noise_multiplier: float = 0.0  # stays at the site (logged)
    train: TrainResult | None = None  # stays at the site


def train_site(cfg: FedTLConfig, model: TransferModel, data: SiteData, policy: PrivacyPolicy, *, run_id: str,
               server_round: int, proposal: Proposal, standardize: FeatureStandardizer | None = None,
               local_head: bool = False) -> SiteRound:
    """One local round under the site's policy: plan, DP-SGD on the suffix, ledger saved before returning.
    ``standardize``: the server's feature statistics, when it sent any (:mod:`fedtl.standardize`).
    ``local_head``: the server asks for ``personalization.kind = local-head``; a site whose policy allows
    personalization (``max-personalize-epochs`` > 0) trains its own head and keeps it
    (:mod:`fedtl.federation.local_head`): in the same DP steps, sharing their per-example clip, or, with
    ``personalize-dp = false``, without noise after them (the update is then the one it would send without it).

    The ledger stays locked from reading it to saving it, so concurrent trainings on one
    state-dir serialize and none can under-count. On decline, the suffix is left untouched.
    """
    n = int(data.labels.shape[0])
    out = SiteRound(site=policy.site, num_examples=n)
    if not policy.dp:  # simulation with --no-dp only (a deployed policy cannot be built so)
        local = _local_head(model, policy, run_id) if local_head else None
        res = train_suffix(model, data.features, data.labels, cfg.train, lr_scale=cfg.adapters.effective_lr_scale(),
                           batch_size=proposal.batch_size, epochs=proposal.epochs,
                           generator=_generator(policy, run_id, server_round), standardize=standardize,
                           local_head=local)
        out.train = res
        if local is not None:
            save_local_head(local, policy, run_id, server_round, dp=False)
        return out
    out.delta, out.accountant, out.budget = policy.delta, policy.accountant, policy.target_epsilon
    releases = Releases(policy.ledger_path.parent / "releases")
    try:
        with open_ledger(policy.ledger_path, site=policy.site, delta=policy.delta, accountant=policy.accountant,
                         target_epsilon=policy.target_epsilon) as ledger:
            if server_round in ledger.rounds_in_run(run_id):  # asked again (the server restarted or retried)
                return _replay(out, ledger, releases, model, run_id, server_round)
            plan = plan_round(policy, ledger, proposal, run_id=run_id, server_round=server_round, num_examples=n)
            if isinstance(plan, Decline):
                out.declined, out.reason, out.epsilon = True, plan.reason, plan.epsilon
                log.warning("Site %s declines round %d: %s", policy.site, server_round, plan.reason)
                return out
            for note in plan.notes:
                log.info("Site %s: %s", policy.site, note)
            local = _local_head(model, policy, run_id) if local_head else None  # not for a replay or a decline
            dp = DPSettings(plan.noise_multiplier, policy.max_grad_norm, plan.sample_rate, policy.accountant)
            res = train_suffix(model, data.features, data.labels, cfg.train, lr_scale=cfg.adapters.effective_lr_scale(),
                               batch_size=plan.batch_size, epochs=plan.epochs, dp=dp,
                               generator=_generator(policy, run_id, server_round), reseed=not policy.seeded,
                               standardize=standardize, local_head=local if policy.personalize_dp else None)
            releases.save(run_id, server_round, model.trainable_state())  # kept to answer a repeated request
            ledger.append(run=run_id, round=server_round, noise_multiplier=plan.noise_multiplier,
                          sample_rate=plan.sample_rate, steps=res.steps)
            ledger.save()  # durable (and its anchor) before the update can leave the site
            out.epsilon, out.noise_multiplier, out.train = ledger.epsilon(), plan.noise_multiplier, res
            if local is not None:  # kept, never sent: trained in the same private steps, or without noise after them
                _keep_local_head(cfg, model, local, data, policy, plan, run_id, server_round, standardize)
    except LedgerError as exc:  # unreadable, tampered, missing or locked: never train blind
        log.error("Site %s declines round %d: %s", policy.site, server_round, exc)
        out.declined = True
        out.reason = (f"Site `{policy.site}` cannot use its privacy ledger (details in the site's log); it will not "
                      "train until its operator restores it.")
        return out
    log.info("Site %s round %d: σ=%.3f, %d steps, train loss %.4f, ε=%.3f of %g", policy.site, server_round,
             out.noise_multiplier, res.steps, res.loss, out.epsilon, policy.target_epsilon)
    return out


def _keep_local_head(cfg, model, local, data, policy, plan, run_id, server_round, standardize) -> None:
    """After the round's ledger entry is saved: the privacy is spent and the update must go out whatever happens
    here, so a failure costs the site its personalization this round (logged), never the round."""
    try:
        if not policy.personalize_dp:
            train_local_head(cfg, model, local, data, batch_size=plan.batch_size, epochs=plan.epochs,
                             generator=_generator(policy, run_id, server_round), standardize=standardize)
        save_local_head(local, policy, run_id, server_round, dp=policy.personalize_dp)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("Site %s could not train or keep its local head in round %d; its update is sent as trained.",
                      policy.site, server_round)


def _local_head(model: TransferModel, policy: PrivacyPolicy, run_id: str):
    if policy.max_personalize_epochs <= 0:
        log.info("Site %s keeps no local head: its policy says max-personalize-epochs = 0 (no personalization).",
                 policy.site)
        return None
    return local_head_for_round(model, policy, run_id)


def _generator(policy: PrivacyPolicy, run_id: str, server_round: int) -> torch.Generator:
    if policy.seeded:  # simulations only: reproducible across runs and resumes of the same config
        return seeded_generator(policy.seed, policy.site, server_round)
    return secret_generator()


def _replay(out: SiteRound, ledger, releases: Releases, model: TransferModel, run_id: str,
            server_round: int) -> SiteRound:
    """The update this site already released for (run, round): sent again, nothing spent again."""
    state = releases.load(run_id, server_round)
    out.epsilon = ledger.epsilon()
    if state is None:
        out.declined = True
        out.reason = (f"Site `{out.site}` already trained round {server_round} of this run and no longer holds that "
                      "update; it will not spend privacy on the same round twice.")
        log.warning("Site %s declines a repeated round %d: its released update is gone.", out.site, server_round)
        return out
    model.load_trainable_state(state)
    log.warning("Site %s: round %d of run %s was already trained; sending the update it released then (ε=%.3f, "
                "nothing spent again).", out.site, server_round, run_id, out.epsilon)
    return out


class Releases:
    """Updates a site has released, by (run, round), so a repeated request is answered without a second
    DP release. Written atomically before the ledger entry; only the latest few are kept."""

    KEEP = 3

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, run_id: str, server_round: int) -> Path:
        import hashlib

        return self.folder / f"{hashlib.sha256(run_id.encode()).hexdigest()[:16]}-{int(server_round):06d}.safetensors"

    def save(self, run_id: str, server_round: int, state: dict[str, torch.Tensor]) -> None:
        from fedtl.federation.checkpoint import save_tensors_atomically

        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors_atomically(state, self._path(run_id, server_round))
        for old in sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[:-self.KEEP]:
            old.unlink(missing_ok=True)

    def load(self, run_id: str, server_round: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(run_id, server_round)
        try:
            return load_file(str(path)) if path.is_file() else None
        except Exception:  # a damaged file: treated as gone
            return None


def ignored_privacy_settings(conf: FedTLConfig, policy: PrivacyPolicy) -> list[str]:
    """The run config's privacy settings that differ from a deployed site's own policy (all ignored)."""
    p = conf.privacy
    mine = policy.describe()
    theirs = {"enabled": (p.enabled, True), "target-epsilon": (p.target_epsilon, mine["target_epsilon"]),
              "delta": (p.delta, mine["delta"]), "accountant": (p.accountant, mine["accountant"]),
              "max-grad-norm": (p.max_grad_norm, mine["max_grad_norm"]),
              "max-epsilon-per-run": (p.max_epsilon_per_run or p.target_epsilon, mine["max_epsilon_per_run"]),
              "max-epsilon-per-round": (p.max_epsilon_per_round or p.target_epsilon / 4, mine["max_epsilon_per_round"]),
              "max-rounds-per-run": (p.max_rounds_per_run, mine["max_rounds_per_run"]),
              "max-noise-multiplier": (p.max_noise_multiplier, mine["max_noise_multiplier"]),
              "personalize-dp": (p.personalize_dp, mine["personalize_dp"]),
              "randomness": (p.randomness, "os"), "site-epsilons": (p.site_epsilons, "")}
    return [f"privacy.{k}={a!r} (site: {b!r})" for k, (a, b) in theirs.items() if a != b]
