"""Hostile-site benchmark: the default federation with 1 or 2 of 10 sites attacking, under each aggregation.

    python simulations/benchmarks/robustness.py --out results/robustness [--aggregations fedavg,fedmedian]

Each run is the default configuration (10 sites, Dirichlet 0.5, ε ≤ 3, 40 rounds) in process: the
honest sites run the ClientApp's own ``train_site``; their replies and the hostile ones are real
Flower ``Message``s handed to the real server strategy (``make_strategy``: validation, bounds and
Flower's aggregation), as in ``fedtl simulate``. Noise is seeded (``privacy.randomness=seeded``) so
that rows differ only by the attack and the aggregation. Attacks (by the first k sites):

- ``sign_flip``: w = g − 100 (w_honest − g)       - ``scale``: w = 10⁶ · w_honest
- ``huge_weight``: w = −50, num-examples = 10¹²    - ``nan``: w_honest with NaN
- ``noise``: w = g + N(0, 1)                       - ``label_flip``: trained (with DP) on flipped labels
- ``stale``: the site's round-1 update replayed in every later round

Writes ``results.jsonl`` (one line per run, as it finishes) and ``robustness.md`` (test AUC and the drop
against the same aggregation without attack).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedtl.config import FedTLConfig
from fedtl.federation.records import coarse_count, to_record, to_state, train_reply
from fedtl.federation.site import (SiteData, build_transfer_model, eval_features, load_source, simulated_policy,
                                   simulated_site_data, train_site)
from fedtl.federation.strategy import make_strategy
from fedtl.privacy import Proposal
from fedtl.standardize import server_standardizer
from fedtl.training import evaluate_suffix

ATTACKS = ("none", "sign_flip", "scale", "huge_weight", "nan", "noise", "label_flip", "stale")


def _identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, attr, value)


def _message(node: int, state: dict, n: float, site: str) -> Message:
    content = train_reply(to_record(state), {"num-examples": 1, "declined": 0.0, "epsilon": 1.0, "delta": 1e-5,
                                             "target-epsilon": 3.0}, site=site, accountant="rdp")
    content["metrics"] = MetricRecord({**dict(content["metrics"]), "num-examples": float(n)})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def run(cfg: FedTLConfig, aggregation: str, attack: str, hostile: int, seed: int = 0) -> dict:
    cfg = cfg.simulated()  # model.pooling = auto, as fedtl simulate's server decides
    source = load_source(cfg.data.path)
    model = build_transfer_model(cfg, source.num_classes)
    val_f, _ = eval_features(cfg, model, source.val, progress=False)
    test_f, _ = eval_features(cfg, model, source.test, progress=False)
    yv, yt = torch.as_tensor(source.val.labels), torch.as_tensor(source.test.labels)
    n_sites = cfg.federation.sites
    sites = [simulated_site_data(cfg, model, s, n_sites) for s in range(n_sites)]
    standardize = server_standardizer(cfg, val_f, model)  # what fedtl simulate's server sends (train.standardize)
    fed = cfg.federation
    strategy = make_strategy(aggregation, model.expected_state(), max_hostile=max(1, hostile), sites=n_sites,
                             update_clip=fed.update_clip, weight_cap=fed.weight_cap, weighting=fed.weighting)
    global_state = model.trainable_state()
    stale: dict[int, dict] = {}
    best = {"val_auc": -1.0}
    gen = torch.Generator().manual_seed(seed)
    for r in range(1, fed.rounds + 1):
        strategy.current = {k: v.detach().numpy().copy() for k, v in global_state.items()}
        replies = []
        for s, data in enumerate(sites):
            model.load_trainable_state(global_state)
            bad = s < hostile and attack != "none"
            if bad and attack == "label_flip":
                data = SiteData(data.name, data.features, 1 - data.labels, data.cache_hit)
            proposal = Proposal(total_rounds=fed.rounds, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)
            res = train_site(cfg, model, data, simulated_policy(cfg, s), run_id="robust", server_round=r,
                             proposal=proposal, standardize=standardize)
            if res.declined:
                continue
            state, n = model.trainable_state(), coarse_count(res.num_examples)
            if bad:
                g = global_state
                if attack == "sign_flip":
                    state = {k: g[k] - 100 * (state[k] - g[k]) for k in state}
                elif attack == "scale":
                    state = {k: 1e6 * v for k, v in state.items()}
                elif attack == "huge_weight":
                    state, n = {k: torch.full_like(v, -50.0) for k, v in state.items()}, 1e12
                elif attack == "nan":
                    state = {k: v.clone() for k, v in state.items()}
                    next(iter(state.values())).view(-1)[0] = float("nan")
                elif attack == "noise":
                    state = {k: g[k] + torch.randn(v.shape, generator=gen) for k, v in state.items()}
                elif attack == "stale":
                    stale.setdefault(s, {k: v.clone() for k, v in state.items()})
                    state = stale[s]
            replies.append(_message(s + 1, state, n, data.name))
        arrays, _ = strategy.aggregate_train(r, replies)
        if arrays is not None:
            global_state = to_state(arrays)
        model.load_trainable_state(global_state)
        v, t = evaluate_suffix(model, val_f, yv), evaluate_suffix(model, test_f, yt)
        if v.auc > best["val_auc"]:
            best = {"round": r, "val_auc": v.auc, "test_auc": t.auc, "test_acc": t.accuracy}
    stats = strategy.rounds
    best.update(rejected=sum(len(s.rejected) for s in stats.values()), bounded=sum(len(s.bounded) for s in stats.values()))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--aggregations", default="fedavg,fedmedian,fedtrimmedavg,krum,multikrum,bulyan")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--hostile", default="1,2")
    args = ap.parse_args()
    _identity()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {(r["aggregation"], r["attack"], r["hostile"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.exists() else set()
    for aggregation in args.aggregations.split(","):
        for attack in args.attacks.split(","):
            for hostile in ([0] if attack == "none" else [int(h) for h in args.hostile.split(",")]):
                if (aggregation, attack, hostile) in done:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = FedTLConfig().with_overrides({"output.state-dir": tmp, "privacy.randomness": "seeded",
                                                        "federation.aggregation": aggregation})
                    t0 = time.perf_counter()
                    row = run(cfg, aggregation, attack, hostile)
                row.update(aggregation=aggregation, attack=attack, hostile=hostile,
                           seconds=round(time.perf_counter() - t0, 1))
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    write_markdown(results, args.out / "robustness.md")
    return 0


def write_markdown(results: Path, target: Path) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    clean = {r["aggregation"]: r["test_auc"] for r in rows if r["attack"] == "none"}
    lines = ["| aggregation | attack | hostile of 10 | test AUC | drop vs. no attack | rejected | bounded |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = clean.get(r["aggregation"], float("nan")) - r["test_auc"]
        lines.append(f"| {r['aggregation']} | {r['attack']} | {r['hostile']} | {r['test_auc']:.4f} | "
                     f"{drop:+.4f} | {r['rejected']} | {r['bounded']} |")
    target.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
