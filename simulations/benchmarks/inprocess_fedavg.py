"""Fast in-process FedAvg over the same library calls the ClientApp makes (for tuning sweeps).

Flower's simulation runtime adds process start-up and messaging but no arithmetic: each round
here is the same ``train_site`` on the same cached features, then FedAvg with the server's weights
(``federation.weighting``: reported counts capped at the median by default) — not the default
MultiKrum selection, nor the update clip.
Final figures are always confirmed with ``fedtl simulate``.

    python simulations/benchmarks/inprocess_fedavg.py --set adapters.kind=none --set train.lr=0.05
    python simulations/benchmarks/inprocess_fedavg.py --model scratch --set train.lr=0.5   # no transfer
    python simulations/benchmarks/inprocess_fedavg.py --model full --set model.resolution=64  # full fine-tuning

The round reported is the one with the best validation AUC (``evaluation.select-by`` = central); test
accuracy is at the decision rule chosen on validation data at that round (``fedtl.evaluation
.central_decision``, as ``fedtl simulate`` does), and ``test_acc_argmax`` at the argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from fedtl.config import FedTLConfig
from fedtl.config_values import parse_assignment
from fedtl.evaluation import central_decision
from fedtl.federation.site import (SiteData, build_transfer_model, eval_features, load_source, simulated_policy,
                                   simulated_site_data, site_indices, train_site)
from fedtl.federation.records import coarse_count
from fedtl.model import check_state
from fedtl.privacy import Proposal
from fedtl.standardize import server_standardizer
from fedtl.training import evaluate_suffix


def weighted_mean(cfg: FedTLConfig, updates: list[tuple[dict, float]]) -> dict:
    """FedAvg of ``(state, reported count)`` pairs with the server's weights (``federation.weighting``)."""
    weights = cfg.federation.aggregation_weights([n for _, n in updates])
    total = sum(weights)
    return {k: sum(st[k] * w for (st, _), w in zip(updates, weights)) / total for k in updates[0][0]}


def run(cfg: FedTLConfig, verbose: bool = False, model_kind: str = "transfer", ema: float = 0.0) -> dict:
    """One federated run; ``model_kind="scratch"``: the small CNN of ``scratch_cnn.py`` on the raw images;
    ``"full"``: the whole pretrained network of ``full_model.py`` trained on the preprocessed images.
    ``ema`` > 0: also evaluate an exponential moving average of the global suffix over rounds (server-side
    post-processing, no privacy cost), reported as ``ema_*`` at its own best-validation round."""
    cfg = cfg.simulated()  # model.pooling = auto, as fedtl simulate's server decides
    source = load_source(cfg.data.path)
    yv, yt = torch.as_tensor(source.val.labels), torch.as_tensor(source.test.labels)
    n = cfg.federation.sites
    if model_kind == "scratch":
        from scratch_cnn import ScratchModel, scratch_features

        channels = 1 if source.train.images.ndim == 3 else source.train.images.shape[-1]
        model = ScratchModel(channels, source.num_classes, seed=cfg.train.seed)
        val_f, test_f, train_f = (scratch_features(s.images) for s in (source.val, source.test, source.train))
        labels = torch.as_tensor(source.train.labels)
        sites, standardize = [], None
        for s in range(n):
            idx = torch.as_tensor(site_indices(cfg, s, n))
            sites.append(SiteData(f"site-{s}", train_f[idx], labels[idx], True))
    elif model_kind == "full":
        from full_model import FullModel, full_features

        model = FullModel(cfg, source.num_classes, seed=cfg.train.seed)
        val_f, test_f, train_f = (full_features(cfg, s.images) for s in (source.val, source.test, source.train))
        labels = torch.as_tensor(source.train.labels)
        sites, standardize = [], None
        for s in range(n):
            idx = torch.as_tensor(site_indices(cfg, s, n))
            sites.append(SiteData(f"site-{s}", train_f[idx], labels[idx], True))
    elif model_kind == "transfer":
        model = build_transfer_model(cfg, source.num_classes)
        val_f, _ = eval_features(cfg, model, source.val, progress=False)
        test_f, _ = eval_features(cfg, model, source.test, progress=False)
        sites = [simulated_site_data(cfg, model, s, n) for s in range(n)]
        standardize = server_standardizer(cfg, val_f, model)  # what fedtl simulate's server sends (train.standardize)
    else:
        raise ValueError(f"model_kind must be transfer, scratch or full, got {model_kind!r}")
    global_state = model.trainable_state()
    best = {"val_auc": -1.0}
    ema_best = {"ema_val_auc": -1.0}
    ema_state = None
    t0 = time.perf_counter()
    eps = {}
    for r in range(1, cfg.federation.rounds + 1):
        updates = []
        for s, data in enumerate(sites):
            model.load_trainable_state(global_state)
            proposal = Proposal(total_rounds=cfg.federation.rounds, batch_size=cfg.train.batch_size,
                                epochs=cfg.train.epochs, noise_multiplier=cfg.privacy.noise_multiplier)
            res = train_site(cfg, model, data, simulated_policy(cfg, s), run_id="tune", server_round=r, proposal=proposal,
                             standardize=standardize)
            eps[s] = res.epsilon
            if res.declined:
                continue
            st = model.trainable_state()
            if check_state(st, model.expected_state()):  # the server drops non-finite updates too
                continue
            updates.append((st, coarse_count(res.num_examples)))  # the count a site reports to the server
        if not updates:  # no valid update: keep the model, as the server does
            continue
        global_state = weighted_mean(cfg, updates)
        model.load_trainable_state(global_state)
        v = evaluate_suffix(model, val_f, yv)
        t = evaluate_suffix(model, test_f, yt)
        if verbose:
            print(f"round {r}: val {v.auc:.4f} test {t.auc:.4f}/{t.accuracy:.4f} eps {max(eps.values()):.3f}", file=sys.stderr)
        if v.auc > best["val_auc"]:
            decision = central_decision(v.probabilities, yv.numpy(), cfg.evaluation.decision)
            best = {"round": r, "val_auc": v.auc, "test_auc": t.auc,
                    "test_acc": float((decision.apply(t.probabilities) == yt.numpy()).mean()),
                    "test_acc_argmax": t.accuracy, "decision": decision.to_dict()}
        if ema > 0:
            ema_state = dict(global_state) if ema_state is None else \
                {k: ema * ema_state[k] + (1 - ema) * global_state[k] for k in global_state}
            model.load_trainable_state(ema_state)
            ev, et = evaluate_suffix(model, val_f, yv), evaluate_suffix(model, test_f, yt)
            if verbose:
                print(f"          ema: val {ev.auc:.4f} test {et.auc:.4f}", file=sys.stderr)
            if ev.auc > ema_best["ema_val_auc"]:
                d = central_decision(ev.probabilities, yv.numpy(), cfg.evaluation.decision)
                ema_best = {"ema_round": r, "ema_val_auc": ev.auc, "ema_test_auc": et.auc,
                            "ema_test_acc": float((d.apply(et.probabilities) == yt.numpy()).mean())}
            model.load_trainable_state(global_state)
    if "round" not in best:
        raise SystemExit("No round had an update: every site declined every round (`fedtl plan` with the same "
                         "--set says why); nothing to report.")
    if ema > 0:
        best.update(ema_best)
    best.update(final_test_auc=t.auc, final_test_acc_argmax=t.accuracy, eps_max=max(eps.values()),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                seconds=time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--model", choices=("transfer", "scratch", "full"), default="transfer",
                   help="scratch: the small CNN of scratch_cnn.py trained from scratch on the raw images (no prefix); "
                        "full: every weight of the pretrained network (full_model.py)")
    p.add_argument("--ema", type=float, default=0.0, help="also evaluate an EMA of the global suffix (decay)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two runs share the 2 cores)")
    p.add_argument("-v", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(parse_assignment(a) for a in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        overrides.setdefault("output.state-dir", tmp)
        cfg = FedTLConfig().with_overrides(overrides)
        res = run(cfg, verbose=args.v, model_kind=args.model, ema=args.ema)
    print(json.dumps({"model": args.model, "overrides": {k: v for k, v in overrides.items() if k != "output.state-dir"}, **res}))


if __name__ == "__main__":
    main()
