"""Reproduce the headline figures: accuracy at a privacy budget, bytes, speed, scale, full-model baseline.

    python simulations/benchmarks/bench.py --out results/bench            # everything (~2 h, 2 cores)
    python simulations/benchmarks/bench.py --out results/bench --only accuracy,speed
    python simulations/benchmarks/bench.py --out results/bench --only accuracy \
        --retinamnist PATH/retinamnist.npz --skip LoRA                           # 5 seeds per row
    python simulations/benchmarks/bench.py --out docs/benchmarks --only accuracy \
        --row "federated 10 sites, DP ε=3 (the default)"     # one row by its exact name (--rows: words, comma-split)

It prints the accuracy rows it selected before running them. Rows run now replace the rows of the same name in
``--out``'s results.json and keep the others; two runs writing the same results.json at once keep only the rows of
the one that writes last.

Writes ``results.json``, ``results.md`` and PNG plots into ``--out``. Accuracy rows use the
in-process FedAvg loop (``inprocess_fedavg.py``: the ClientApp's own calls, no process
start-up); scale rows run the real ``fedtl simulate``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from inprocess_fedavg import run as run_inprocess  # noqa: E402

from fedtl.config import FedTLConfig  # noqa: E402

MEDMNIST_V2 = [  # published PneumoniaMNIST test rows (Yang et al., Sci Data 2023): AUC, ACC
    ("ResNet-18 (28)", 0.944, 0.854), ("ResNet-18 (224)", 0.956, 0.864), ("ResNet-50 (28)", 0.948, 0.854),
    ("ResNet-50 (224)", 0.962, 0.884), ("auto-sklearn", 0.942, 0.855), ("AutoKeras", 0.947, 0.878),
    ("Google AutoML Vision", 0.991, 0.946),
]

SEEDS = (0, 1, 2, 3, 4)
SCRATCH_LR = 0.05  # chosen on validation AUC, seed 0 (docs/benchmarks.md, "No transfer")


MEAN_POOLING = {"model.pooling": "avg", "train.standardize": "none"}  # the head's input before 2026-12-02


def accuracy_plan(retinamnist: str = "") -> list[tuple[str, str, dict]]:
    """(row name, model kind, config overrides). ``retinamnist``: the RetinaMNIST npz for its rows ("" = none).

    "(the default)" rows run ``FedTLConfig``'s defaults: mean, std and quadrant pooling of the cut network's maps,
    the head trained on features standardized with the server's validation statistics (``train.standardize``),
    4 views per training image, and the prediction averaged over 4 shifted views of a test image
    (``evaluation.views``, since 2026-12-06). "mean pooling" rows are the head on the spatial mean, unstandardized (the default
    before 2026-12-02); ``train.views=1`` rows are without augmentation multiplicity."""
    one, mean = {"train.views": 1}, MEAN_POOLING
    rows = []
    for eps in (3.0, 1.0):
        rows.append((f"federated 10 sites, DP ε={eps:g} (the default)", "transfer",
                     {"federation.sites": 10, "privacy.target-epsilon": eps}))
    rows.append(("federated 10 sites, non-private (the default)", "transfer",
                 {"federation.sites": 10, "privacy.enabled": False}))
    # a smaller input for the 28-px images: tried 2026-12-06 night, not adopted (docs/benchmarks.md, "Input resolution")
    for eps in (3.0, 1.0):
        rows.append((f"federated 10 sites, DP ε={eps:g}, model.resolution=64 (tried, not adopted)", "transfer",
                     {"federation.sites": 10, "privacy.target-epsilon": eps, "model.resolution": 64}))
    # test-time views (evaluation.views, auto = the 4 training views since 2026-12-06) against the image alone
    rows.append(("federated 10 sites, DP ε=3, evaluation.views=1 (the default before 2026-12-06)", "transfer",
                 {"federation.sites": 10, "privacy.target-epsilon": 3.0, "evaluation.views": 1}))
    rows += [
        ("centralized, non-private, head only, train.views=1, mean pooling", "transfer",
         {"federation.sites": 1, "privacy.enabled": False, "adapters.kind": "none", "adapters.blocks": 0, **one, **mean}),
        ("federated 10 sites, non-private, train.views=1, mean pooling", "transfer",
         {"federation.sites": 10, "privacy.enabled": False, **one, **mean}),
    ]
    for eps in (3.0, 1.0, 8.0):
        rows.append((f"federated 10 sites, DP ε={eps:g}, train.views=1, mean pooling", "transfer",
                     {"federation.sites": 10, "privacy.target-epsilon": eps, **one, **mean}))
    rows.append(("federated 3 sites, DP ε=3, train.views=1, mean pooling", "transfer",
                 {"federation.sites": 3, "privacy.target-epsilon": 3.0, **one, **mean}))
    for eps in (3.0, 1.0):
        rows.append((f"federated 10 sites, DP ε={eps:g}, train.views=4, mean pooling", "transfer",
                     {"federation.sites": 10, "privacy.target-epsilon": eps, "train.views": 4, **mean}))
    # no transfer: the same federation and budget, a small CNN trained from scratch (scratch_cnn.py)
    rows.append(("no transfer: small CNN from scratch, federated 10 sites, DP ε=3", "scratch",
                 {"federation.sites": 10, "privacy.target-epsilon": 3.0, "train.lr": SCRATCH_LR}))
    if retinamnist:
        retina = {"data.path": retinamnist, "federation.sites": 10, "privacy.target-epsilon": 3.0}
        # model.head = auto: MedMNIST declares RetinaMNIST's classes graded, so the default is the ordinal head (one
        # score and ordered cut points) since 2026-12-06 evening; the linear head was the default before
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3 (the default: ordinal head, from the declared grades)",
                     "transfer", retina))
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3, model.resolution=64 (tried, not adopted)", "transfer",
                     {**retina, "model.resolution": 64}))
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3, linear head (the default before 2026-12-06 evening)",
                     "transfer", {**retina, "model.head": "linear"}))
        # lr 0.1 chosen on validation AUC among 0.05 / 0.1 / 0.2 (docs/benchmarks.md, RetinaMNIST)
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3, ordinal head, lr 0.1", "transfer",
                     {**retina, "model.head": "ordinal", "train.lr": 0.1}))
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3, ordinal head, lr 0.1, evaluation.views=1", "transfer",
                     {**retina, "model.head": "ordinal", "train.lr": 0.1, "evaluation.views": 1}))
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3, train.views=1, mean pooling", "transfer",
                     {**retina, "model.head": "linear", **one, **mean}))
        rows.append(("RetinaMNIST: federated 10 sites, DP ε=3, train.views=4, mean pooling", "transfer",
                     {**retina, "model.head": "linear", "train.views": 4, **mean}))
        rows.append(("RetinaMNIST, no transfer: small CNN from scratch, 10 sites, DP ε=3", "scratch",
                     {**retina, "train.lr": SCRATCH_LR}))
    # the LoRA suffix runs a backbone block per step: the slowest row, so last and with 20 rounds
    rows.append(("centralized, non-private, LoRA suffix (20 rounds)", "transfer",
                 {"federation.sites": 1, "privacy.enabled": False, "adapters.kind": "lora", "adapters.blocks": 1,
                  "train.lr": 0.01, "federation.rounds": 20}))
    # issue 11, item 4: fine-tuning more of the network, same federation and budget. SLOW rows: run only when named
    # (--row / --rows); seconds per seed on 2 cores in their names (docs/benchmarks.md, "Fine-tuning more of the network")
    dp3 = {"federation.sites": 10, "privacy.target-epsilon": 3.0}
    rows.append((f"{SLOW} unfreeze block4_2 (adapters.kind=unfreeze), federated 10 sites, DP ε=3 (~12 min a seed)",
                 "transfer", {**dp3, "adapters.kind": "unfreeze", "adapters.blocks": 1}))
    rows.append((f"{SLOW} whole backbone but the stem unfrozen, BatchNorm frozen, 64 px, federated 10 sites, DP ε=3 "
                 "(~100 min a seed)", "transfer",
                 {**dp3, "model.cut-after": "", "adapters.kind": "unfreeze", "adapters.blocks": 17,
                  "model.resolution": 64}))
    rows.append((f"{SLOW} whole network fine-tuned, BatchNorm -> GroupNorm, 64 px, federated 10 sites, DP ε=3 "
                 "(~50-100 min a seed)", "full", {**dp3, "model.resolution": 64, "adapters.lr-scale": 0.1}))
    return rows


SLOW = "[slow]"  # rows that run only when --row or --rows names them


def selected_rows(retinamnist: str = "", skip: tuple[str, ...] = (), only: tuple[str, ...] = (),
                  exact: tuple[str, ...] = ()) -> list[tuple[str, str, dict]]:
    """The accuracy rows a run selects: not ``skip``ped, containing one of the ``only`` words, and, with ``exact``,
    named exactly so (``--row``: a name with commas, which ``--rows`` splits, picks that row alone). An exact name
    that is not a row is an error naming the closest ones. :data:`SLOW` rows run only when ``only`` or ``exact``
    selects them."""
    plan = accuracy_plan(retinamnist)
    names = [name for name, _, _ in plan]
    unknown = [n for n in exact if n not in names]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
        raise SystemExit(f"no accuracy row is named {unknown[0]!r}" + (f"; closest: {close}" if close else "") +
                         ("" if retinamnist else " (RetinaMNIST rows need --retinamnist)"))
    return [(name, kind, overrides) for name, kind, overrides in plan
            if not any(word in name for word in skip) and (not only or any(word in name for word in only))
            and (not exact or name in exact) and (only or exact or not name.startswith(SLOW))]


def accuracy_rows(save=lambda rows: None, retinamnist: str = "", skip: tuple[str, ...] = (),
                  only: tuple[str, ...] = (), exact: tuple[str, ...] = ()) -> list[dict]:
    out = []
    chosen = selected_rows(retinamnist, skip, only, exact)
    print(f"accuracy rows to run ({len(chosen)}, {len(SEEDS)} seeds each):\n" +
          "\n".join(f"  {name}" for name, _, _ in chosen), file=sys.stderr, flush=True)
    for name, kind, overrides in chosen:
        results = []
        for seed in SEEDS:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = FedTLConfig().with_overrides({**overrides, "data.seed": 42 + seed, "train.seed": seed,
                                                    "output.state-dir": tmp})
                results.append(run_inprocess(cfg, model_kind=kind))
        auc = [r["test_auc"] for r in results]
        acc = [r["test_acc"] for r in results]
        arg = [r["test_acc_argmax"] for r in results]
        row = {"name": name, "model": kind, "overrides": overrides, "seeds": len(results),
               "test_auc_mean": statistics.mean(auc), "test_auc_std": statistics.stdev(auc),
               "test_acc_mean": statistics.mean(acc), "test_acc_std": statistics.stdev(acc),
               "test_acc_argmax_mean": statistics.mean(arg), "test_acc_argmax_std": statistics.stdev(arg),
               "eps_max": max(r["eps_max"] for r in results), "trainable_params": results[0]["trainable_params"],
               "seconds_mean": statistics.mean(r["seconds"] for r in results), "runs": results}
        print(f"{name}: AUC {row['test_auc_mean']:.4f} ± {row['test_auc_std']:.4f}, ACC {row['test_acc_mean']:.4f} ± "
              f"{row['test_acc_std']:.4f} (argmax {row['test_acc_argmax_mean']:.4f})", file=sys.stderr, flush=True)
        out.append(row)
        save(out)
    return out


def speed_rows() -> dict:
    """One site's local round: cached prefix features vs. running the frozen prefix every step."""
    from fedtl.data import Preprocessing
    from fedtl.federation.site import build_transfer_model, load_source, preprocessing_for, simulated_site_data
    from fedtl.features import compute_prefix_features
    from fedtl.privacy import calibrate_noise
    from fedtl.privacy.policy import steps_per_epoch
    from fedtl.training import DPSettings, train_suffix

    torch.set_num_threads(2)
    cfg = FedTLConfig().with_overrides({"data.partitioner": "iid", "train.views": 1})  # one view: the live prefix's
    cfg = cfg.simulated()
    source = load_source(cfg.data.path)
    model = build_transfer_model(cfg, source.num_classes)
    pre: Preprocessing = preprocessing_for(cfg)
    t = time.perf_counter()
    compute_prefix_features(model, pre, source.train)
    cache_build = time.perf_counter() - t
    data = simulated_site_data(cfg, model, 0, cfg.federation.sites)
    n = int(data.labels.shape[0])
    batch = min(cfg.train.batch_size, n)
    q = 1.0 / steps_per_epoch(n, batch)
    sigma = calibrate_noise(cfg.privacy.target_epsilon, cfg.privacy.delta, q,  # the whole run's steps, as a site plans
                            steps_per_epoch(n, batch) * cfg.train.epochs * cfg.federation.rounds)
    dp_settings = DPSettings(sigma, cfg.privacy.max_grad_norm, q, cfg.privacy.accountant)

    def one_round(dp: bool, live_prefix: bool) -> float:
        m = build_transfer_model(cfg, source.num_classes)
        t0 = time.perf_counter()
        feats = data.features
        if live_prefix:  # what a plain implementation pays every round: the frozen prefix over every image
            from fedtl.data import ImageSet
            from fedtl.federation.site import site_indices

            idx = site_indices(cfg, 0, cfg.federation.sites)
            images = ImageSet(source.train.images[idx], source.train.labels[idx])
            feats = compute_prefix_features(m, pre, images)
        train_suffix(m, feats, data.labels, cfg.train, batch_size=batch, dp=dp_settings if dp else None)
        return time.perf_counter() - t0

    one_round(True, False)  # warm-up (imports, noise calibration)
    cached_dp = statistics.median(one_round(True, False) for _ in range(3))
    cached_plain = statistics.median(one_round(False, False) for _ in range(3))
    live_dp = one_round(True, True) * cfg.train.epochs
    return {"site_examples": int(data.labels.shape[0]), "cache_build_seconds_train_split": cache_build,
            "round_seconds_cached_dp": cached_dp, "round_seconds_cached_nondp": cached_plain,
            "round_seconds_prefix_every_step_dp": live_dp, "speedup_cached_vs_live": live_dp / cached_dp,
            "dp_overhead": cached_dp / cached_plain}


def comms_rows() -> dict:
    from fedtl.backbones import build_backbone
    from fedtl.federation.records import record_bytes, to_record
    from fedtl.federation.site import build_transfer_model, load_source

    cfg = FedTLConfig().resolved(True)
    model = build_transfer_model(cfg, load_source(cfg.data.path).num_classes)
    ours = record_bytes(to_record(model.trainable_state()))
    bb = build_backbone(cfg.model.backbone)
    full = torch.nn.Sequential(bb.features(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(bb.spec.feature_dim, 2))
    baseline = record_bytes(to_record(full.state_dict()))  # a plain Flower user ships the whole state dict
    lora = build_transfer_model(FedTLConfig().with_overrides({"adapters.kind": "lora", "adapters.blocks": 1})
                                .resolved(True), 2)  # auto: the mean (adapters do not train standardized)
    lora_bytes = record_bytes(to_record(lora.trainable_state()))
    return {"bytes_per_site_round_ours": ours, "bytes_per_site_round_lora_suffix": lora_bytes,
            "bytes_per_site_round_full_model": baseline, "fraction": ours / baseline, "fraction_lora": lora_bytes / baseline}


def scale_rows(sites_list=(100, 1000), rounds: int = 3) -> list[dict]:
    import psutil

    rows = []
    for sites in sites_list:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "fedtl.cli", "simulate", "--out", str(out), "--sites", str(sites), "--rounds",
                   str(rounds), "--set", "data.partitioner=iid", "--set", f"federation.fraction-train={10 / sites}"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            peak = 0
            while proc.poll() is None:
                try:
                    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
                except psutil.Error:
                    pass
                time.sleep(0.5)
            _, err = proc.communicate()
            if proc.returncode != 0:
                rows.append({"sites": sites, "error": err[-2000:]})
                continue
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            secs = [b["seconds"] - a["seconds"] for a, b in zip(metrics, metrics[1:])]
            summary = json.loads((out / "summary.json").read_text())
            rows.append({"sites": sites, "sampled_per_round": 10, "rounds": rounds, "peak_rss_bytes": peak,
                         "round_seconds_mean": statistics.mean(secs), "wall_seconds": summary["wall_seconds"]})
            print(f"scale {sites}: peak {peak / 2**30:.2f} GiB, {statistics.mean(secs):.1f} s/round", file=sys.stderr, flush=True)
    return rows


def full_model_baseline(budget_seconds: float = 300.0) -> dict:
    """DP-SGD over the whole backbone, as a plain Flower + Opacus user would (BatchNorm → GroupNorm),
    on one site's images; reports time per step and the round time it implies for 10 sites."""
    from full_model import full_network

    from fedtl.federation.site import load_source, preprocessing_for
    from fedtl.privacy.engine import make_private
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(2)
    cfg = FedTLConfig()
    source = load_source(cfg.data.path)
    net = full_network(cfg, 2).train()  # the network of full_model.py (BatchNorm -> GroupNorm), as the accuracy row
    pre = preprocessing_for(cfg)
    n = 470  # one site of ten
    x = pre(source.train.images[:n])
    y = torch.as_tensor(source.train.labels[:n])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    module, opt, loader, _ = make_private(net, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", history=[])
    steps, t0 = 0, time.perf_counter()
    for xb, yb in loader:
        if xb.shape[0] == 0:
            continue
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xb), yb).backward()
        opt.step()
        steps += 1
        if time.perf_counter() - t0 > budget_seconds:
            break
    per_step = (time.perf_counter() - t0) / max(1, steps)
    params = sum(p.numel() for p in net.parameters())
    return {"steps_run": steps, "seconds_per_step": per_step, "site_round_seconds": per_step * len(loader),
            "round_seconds_10_sites_2_cores": per_step * len(loader) * 10 / 2, "trainable_params": params,
            "budget_seconds": budget_seconds}


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lines = ["| setting | seeds | test AUC (mean ± std) | test ACC at the rule (mean ± std) | ACC at the argmax | "
             "trainable params | max site ε |", "|---|---|---|---|---|---|---|"]
    for r in results.get("accuracy", []):
        eps = f"{r['eps_max']:.2f}" if r["eps_max"] > 0 else "—"
        lines.append(f"| {r['name']} | {r.get('seeds', 3)} | {r['test_auc_mean']:.3f} ± {r['test_auc_std']:.3f} | "
                     f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f} | "
                     + (f"{r['test_acc_argmax_mean']:.3f} ± {r['test_acc_argmax_std']:.3f} | " if "test_acc_argmax_mean" in r
                        else "— | ")
                     + f"{r.get('trainable_params', '')} | {eps} |")
    for name, auc, acc in MEDMNIST_V2:
        lines.append(f"| MedMNIST v2: {name} (centralized, non-private) | — | {auc:.3f} | {acc:.3f} | — | — | — |")
    md = ["# fedtl benchmark results", "", "## Accuracy (test splits; PneumoniaMNIST unless the row says otherwise)",
          "", *lines, ""]
    for key in ("comms", "speed", "full_model_baseline"):
        if key in results:
            md += [f"## {key}", "", "| figure | value |", "|---|---|"]
            md += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results[key].items()]
            md.append("")
    if "scale" in results:
        md += ["## scale", "", "| sites | sampled per round | peak RSS (GiB) | s / round |", "|---|---|---|---|"]
        md += [f"| {r['sites']} | {r.get('sampled_per_round', '')} | {r.get('peak_rss_bytes', 0) / 2**30:.2f} | "
               f"{r.get('round_seconds_mean', float('nan')):.1f} |" for r in results["scale"]]
    (out / "results.md").write_text("\n".join(md) + "\n")

    if results.get("accuracy"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for sites in (3, 10):
            for views in (1, 4):
                pts = [(r["overrides"]["privacy.target-epsilon"], r["test_auc_mean"], r["test_auc_std"])
                       for r in results["accuracy"]
                       if r["overrides"].get("federation.sites") == sites and "privacy.target-epsilon" in r["overrides"]
                       and r.get("model", "transfer") == "transfer" and "data.path" not in r["overrides"]
                       and int(r["overrides"].get("train.views", 1)) == views]
                if pts:
                    xs, ys, es = zip(*sorted(pts))
                    what = f"train.views={views}"
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"fedtl, {sites} sites, DP, {what}")
        ax.axhline(0.944, color="gray", ls="--", label="MedMNIST v2 ResNet-18 (28), non-private")
        ax.axhline(0.956, color="gray", ls=":", label="MedMNIST v2 ResNet-18 (224), non-private")
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8], ["1", "3", "8"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("per-site ε (δ = 1e-5)")
        ax.set_ylabel("test AUC")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "auc_vs_epsilon.png", dpi=120)
        plt.close(fig)
    if "comms" in results:
        c = results["comms"]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(["full model (plain FedAvg)", "fedtl LoRA suffix", "fedtl default suffix"],
                [c["bytes_per_site_round_full_model"], c["bytes_per_site_round_lora_suffix"], c["bytes_per_site_round_ours"]])
        ax.set_xscale("log")
        ax.set_xlabel("bytes per site per round (log)")
        fig.tight_layout()
        fig.savefig(out / "bytes_per_round.png", dpi=120)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="accuracy,comms,speed,scale,baseline")
    p.add_argument("--baseline-seconds", type=float, default=300.0)
    p.add_argument("--retinamnist", default="", metavar="NPZ",
                   help="the RetinaMNIST npz (MedMNIST v2): adds its rows to the accuracy table")
    p.add_argument("--skip", default="", help="comma-separated words: accuracy rows whose name contains one are skipped")
    p.add_argument("--rows", default="", help="comma-separated words: only the accuracy rows whose name contains one")
    p.add_argument("--row", action="append", default=[], metavar="NAME",
                   help="an accuracy row's exact name (repeatable; for names with commas): only these rows")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    parts = set(args.only.split(","))
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    kept = list(results.get("accuracy", []))

    def save_accuracy(rows: list[dict]) -> None:  # rows run now replace those of the same name; others are kept
        fresh = {r["name"]: r for r in rows}
        merged = [fresh.pop(r["name"], r) for r in kept]
        results["accuracy"] = merged + list(fresh.values())
        path.write_text(json.dumps(results, indent=1))
        write_report(results, out)

    def run_accuracy() -> list[dict]:  # the merged table: rows not run now stay as they were
        accuracy_rows(save_accuracy, args.retinamnist, tuple(w for w in args.skip.split(",") if w),
                      tuple(w for w in args.rows.split(",") if w), tuple(args.row))
        return results.get("accuracy", kept)

    sections = [("comms", "comms", comms_rows), ("speed", "speed", speed_rows),
                ("accuracy", "accuracy", run_accuracy),
                ("scale", "scale", scale_rows),
                ("baseline", "full_model_baseline", lambda: full_model_baseline(args.baseline_seconds))]
    for part, key, fn in sections:
        if part in parts:
            results[key] = fn()
            path.write_text(json.dumps(results, indent=1))  # keep what is done if a later part fails
            write_report(results, out)
    print(f"wrote {path}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
