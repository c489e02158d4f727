"""A simulation run's selected suffix under each decision rule, scored on the data set's whole test split.

    fedtl simulate --data …/retinamnist.npz --set evaluation.central=off --out runs/fed-0
    python simulations/benchmarks/decision_rules.py runs/fed-0 [runs/fed-1 …]

For each run directory (a ``fedtl simulate`` run; its config names the data set and the federation) the script
rebuilds the simulated sites' evaluation shares, lets each release its prediction rows (multi-class) or score
histograms (binary) as a site does (``fedtl.federation.site.evaluate_site``), and chooses the rule from them as the
server does (``SiteEvaluation.choose_decision``; per-class offsets with 5 or more sites without the best and the
worst site at each candidate, and again without that trimming); for comparison, the central rule on the whole
validation split (``fedtl.evaluation.central_decision``) and the argmax. It prints one JSON line a run: test AUC and
the accuracy of each rule on the whole test split, the rule the run stored, and the offsets. Nothing is trained; the
features come from the feature cache.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def score(run_dir: str) -> dict:
    from fedtl.evaluation import Decision, auc_of, central_decision
    from fedtl.federation.fedeval import SiteEvaluation, eval_reply, parse_eval_reply
    from fedtl.federation.site import evaluate_site, eval_features, load_source, simulated_eval_data
    from fedtl.inference import load_run
    from fedtl.training import evaluate_suffix

    run = load_run(run_dir)
    cfg, model = run.config, run.model
    k, sites = model.num_classes, cfg.federation.sites
    ev = SiteEvaluation()
    for i in range(sites):
        figs = evaluate_site(model, simulated_eval_data(cfg, model, i, sites))
        name, parsed, reason = parse_eval_reply(eval_reply(figs, site=f"site-{i}"), k)  # as the reply travels
        ev.add(name, parsed, reason)
    source = load_source(cfg.data.path)
    probs = {}
    for split in ("val", "test"):
        feats, _ = eval_features(cfg, model, source.split(split), progress=False)
        labels = torch.as_tensor(source.split(split).labels)
        probs[split] = (evaluate_suffix(model, feats, labels).probabilities, labels.numpy())
    (vp, vy), (tp, ty) = probs["val"], probs["test"]
    rules = {"argmax": Decision(), "stored": run.decision, "federated": ev.choose_decision(k),
             **({"federated, untrimmed": ev.choose_decision(k, trim_from=10**9)} if k > 2 else {}),
             "central": central_decision(vp, vy)}
    return {"run": run_dir, "test_auc": round(auc_of(tp, ty), 4),
            **{f"acc {name}": round(float(np.mean(d.apply(tp) == ty)), 4) for name, d in rules.items()},
            "stored": run.decision.describe(),
            "offsets": {name: [round(b, 1) for b in d.bias] for name, d in rules.items() if d.rule == "bias"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="fedtl simulate run directories")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        rows.append(score(run))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        for key in [k for k in rows[0] if k.startswith("acc ") or k == "test_auc"]:
            vals = [r[key] for r in rows]
            print(f"{key}: {np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}")


if __name__ == "__main__":
    main()
