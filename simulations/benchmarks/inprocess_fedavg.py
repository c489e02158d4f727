"""Fast in-process FedAvg over the same library calls the ClientApp makes (for tuning sweeps).

Flower's simulation runtime adds process start-up and messaging but no arithmetic: each round
here is the same ``train_site`` on the same cached features, then FedAvg weighted by examples.
Final figures are always confirmed with ``fedtl simulate``.

    python simulations/benchmarks/inprocess_fedavg.py --set adapters.kind=none --set train.lr=0.05
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from fedtl.config import FedTLConfig, parse_assignment
from fedtl.federation.site import (build_transfer_model, cached_features, load_source, simulated_policy,
                                   simulated_site_data, train_site)
from fedtl.federation.records import coarse_count
from fedtl.model import check_state
from fedtl.privacy import Proposal
from fedtl.training import evaluate_suffix


def run(cfg: FedTLConfig, verbose: bool = False) -> dict:
    source = load_source(cfg.data.path)
    model = build_transfer_model(cfg, source.num_classes)
    val_f, _ = cached_features(cfg, model, source.val, progress=False)
    test_f, _ = cached_features(cfg, model, source.test, progress=False)
    yv, yt = torch.as_tensor(source.val.labels), torch.as_tensor(source.test.labels)
    n = cfg.federation.sites
    sites = [simulated_site_data(cfg, model, s, n) for s in range(n)]
    global_state = model.trainable_state()
    best = {"val_auc": -1.0}
    t0 = time.perf_counter()
    eps = {}
    for r in range(1, cfg.federation.rounds + 1):
        acc, total = None, 0
        for s, data in enumerate(sites):
            model.load_trainable_state(global_state)
            proposal = Proposal(total_rounds=cfg.federation.rounds, batch_size=cfg.train.batch_size,
                                epochs=cfg.train.epochs, noise_multiplier=cfg.privacy.noise_multiplier)
            res = train_site(cfg, model, data, simulated_policy(cfg, s), run_id="tune", server_round=r, proposal=proposal)
            eps[s] = res.epsilon
            if res.declined:
                continue
            w = coarse_count(res.num_examples)  # the weight a site reports to the server
            st = model.trainable_state()
            if check_state(st, model.expected_state()):  # the server drops non-finite updates too
                continue
            acc = {k: v * w for k, v in st.items()} if acc is None else {k: acc[k] + st[k] * w for k in acc}
            total += w
        if acc is None:  # no valid update: keep the model, as the server does
            continue
        global_state = {k: v / total for k, v in acc.items()}
        model.load_trainable_state(global_state)
        v = evaluate_suffix(model, val_f, yv)
        t = evaluate_suffix(model, test_f, yt)
        if verbose:
            print(f"round {r}: val {v.auc:.4f} test {t.auc:.4f}/{t.accuracy:.4f} eps {max(eps.values()):.3f}", file=sys.stderr)
        if v.auc > best["val_auc"]:
            best = {"round": r, "val_auc": v.auc, "test_auc": t.auc, "test_acc": t.accuracy}
    best.update(final_test_auc=t.auc, final_test_acc=t.accuracy, eps_max=max(eps.values()), seconds=time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", action="append", default=[])
    p.add_argument("-v", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = dict(parse_assignment(a) for a in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        overrides.setdefault("output.state-dir", tmp)
        cfg = FedTLConfig().with_overrides(overrides)
        res = run(cfg, verbose=args.v)
    print(json.dumps({"overrides": {k: v for k, v in overrides.items() if k != "output.state-dir"}, **res}))


if __name__ == "__main__":
    main()
