"""Site shift: each site's images pass through its own acquisition chain; global vs personalized AUC per site.

PneumoniaMNIST split over N sites (label split: ``--set data.partitioner=…``, default Dirichlet 0.5; the
pathological split gives single-class sites whose AUC is undefined, reported as null). Before the frozen
prefix, every image of a site — training, validation and test share alike — goes through that site's
deterministic acquisition transform (torchvision): contrast, gamma, blur, resolution, noise, and one site
whose scanner stores inverted grey levels (DICOM MONOCHROME1). Each site is evaluated on its own shares of
the validation and test splits, transformed like its training images: by default an iid share (the data
set's class mix); ``--eval-split like-train`` draws it with the site's training class mix, as simulated
sites are evaluated — under Dirichlet 0.5 that left one image of a class in some sites' test shares.

The federation runs in process over the library calls the ClientApp makes (``train_site`` with the
site's plan, FedAvg with the server's weights, as ``inprocess_fedavg.py``); the round is
selected by the sites' pooled validation AUC; then every site runs ``personalize_site`` — DP fine-tuning
of the selected suffix, its ε reserved from round 1, kept only on validation evidence
(``choose_personal``); with ``--set personalization.kind=local-head`` each site instead trains a local head in
the rounds' own DP steps (``train_site(local_head=True)``) and weighs it against the global head. One JSON line:
per-site test AUC global vs personal, the worst site's gain, the largest loss.

    python simulations/benchmarks/site_shift.py --sites 5 --set federation.rounds=15
    python simulations/benchmarks/site_shift.py --sites 5 --set personalization.kind=local-head
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import numpy as np
import torch

from fedtl.config import FedTLConfig
from fedtl.config_values import parse_assignment
from fedtl.data import ImageSet, partition_indices
from fedtl.federation.personal_site import personalize_site
from fedtl.federation.personalize import Personalization, compare, parse_personal_reply, personal_reply
from fedtl.federation.records import coarse_count
from fedtl.federation.site import (SiteData, SiteEvalData, build_transfer_model, eval_features, evaluate_site,
                                   load_source, share_like, simulated_policy, train_features, train_site)
from fedtl.model import check_state
from fedtl.privacy import Proposal
from fedtl.standardize import server_standardizer
from inprocess_fedavg import weighted_mean  # this folder: the same aggregation as the tuning loop

DATA = "/work/shared/data/medmnist/pneumoniamnist.npz"
# One acquisition chain per site (cycled for more sites): what differs between scanners and protocols.
SHIFTS = (
    {"name": "reference"},
    {"name": "low contrast, gamma 1.8", "contrast": 0.5, "gamma": 1.8},
    {"name": "blur, 14 px detector", "blur": 1.2, "resolution": 14},
    {"name": "noise 0.12, gamma 0.6", "noise": 0.12, "gamma": 0.6},
    {"name": "inverted grey levels (MONOCHROME1), contrast 1.4", "invert": True, "contrast": 1.4},
)


def acquire(images: np.ndarray, shift: dict, seed: int) -> np.ndarray:
    """``images`` (N, H, W) grey or (N, H, W, 3) RGB uint8 through one site's acquisition chain; deterministic for
    (shift, seed)."""
    import torchvision.transforms.v2.functional as F

    rgb = images.ndim == 4
    x = torch.as_tensor(images).float().div(255)
    x = x.permute(0, 3, 1, 2) if rgb else x.unsqueeze(1)  # (N, C, H, W) in [0, 1]
    h, w = x.shape[-2:]
    if "resolution" in shift:
        r = int(shift["resolution"])
        x = F.resize(F.resize(x, [r, r], antialias=True), [h, w], antialias=True)
    if "blur" in shift:
        x = F.gaussian_blur(x, kernel_size=[5, 5], sigma=[shift["blur"]] * 2)
    if "contrast" in shift:
        x = F.adjust_contrast(x, shift["contrast"])
    if "gamma" in shift:
        x = F.adjust_gamma(x.clamp(0, 1), shift["gamma"])
    if "noise" in shift:
        g = torch.Generator().manual_seed(seed)
        x = x + shift["noise"] * torch.randn(x.shape, generator=g)
    if shift.get("invert"):
        x = 1 - x
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return (x.permute(0, 2, 3, 1) if rgb else x.squeeze(1)).numpy()


def site_sets(cfg: FedTLConfig, n_sites: int, eval_split: str = "iid"):
    """Per site: (shift, train ImageSet, {split: ImageSet}), images transformed by the site's chain."""
    source = load_source(cfg.data.path)
    d = cfg.data
    parts = partition_indices(source.train.labels, n_sites, d.partitioner, alpha=d.alpha,
                              classes_per_site=d.classes_per_site, seed=d.seed)
    if eval_split == "iid":  # each site's evaluation share: the data set's class mix
        evals = {s: partition_indices(source.split(s).labels, n_sites, "iid", seed=d.seed + 1) for s in ("val", "test")}
    else:  # its training partition's class mix, as simulated sites are evaluated
        evals = {s: share_like([source.train.labels[p] for p in parts], source.split(s).labels, d.seed + 1)
                 for s in ("val", "test")}
    out = []
    for i, idx in enumerate(parts):
        shift = SHIFTS[i % len(SHIFTS)]

        def shifted(images: ImageSet, tag: str) -> ImageSet:
            return ImageSet(acquire(images.images, shift, seed=1000 * i + ("train", "val", "test").index(tag)), images.labels, images.name)

        train = shifted(source.train.subset(idx, f"site-{i}-train"), "train")
        splits = {s: shifted(source.split(s).subset(evals[s][i], f"site-{i}-{s}"), s) for s in ("val", "test")}
        out.append((shift, train, splits))
    return out


def pooled_val_auc(model, evals: list[SiteEvalData]) -> float:
    """Example-weighted mean of the sites' validation AUCs (the federated selection figure)."""
    num = den = 0.0
    for ev in evals:
        f = evaluate_site(model, SiteEvalData(ev.name, {"val": ev.splits["val"]}))["val"]
        if f.get("n") and math.isfinite(f.get("auc", math.nan)):
            num, den = num + f["n"] * f["auc"], den + f["n"]
    return num / den if den else math.nan


def run(cfg: FedTLConfig, n_sites: int, eval_split: str = "iid", verbose: bool = False) -> dict:
    cfg = cfg.simulated()  # model.pooling = auto, as fedtl simulate's server decides
    t0 = time.perf_counter()
    source = load_source(cfg.data.path)
    model = build_transfer_model(cfg, source.num_classes)
    sites, evals, shifts = [], [], []
    for i, (shift, train, splits) in enumerate(site_sets(cfg, n_sites, eval_split)):
        feats, _ = train_features(cfg, model, train, progress=False)
        sites.append(SiteData(f"site-{i}", feats, torch.as_tensor(train.labels), True))
        evals.append(SiteEvalData(f"site-{i}", {s: (eval_features(cfg, model, im, progress=False)[0],
                                                    torch.as_tensor(im.labels)) for s, im in splits.items()}))
        shifts.append(shift["name"])
    t_features = time.perf_counter() - t0
    # the server's statistics (train.standardize): its own validation split, which no site's shift touches
    standardize = server_standardizer(cfg, eval_features(cfg, model, source.val, progress=False)[0], model)
    rounds, ft_epochs = cfg.federation.rounds, cfg.personalization.requested_epochs
    global_state, best = model.trainable_state(), -math.inf
    best_state, best_round = global_state, 0
    for r in range(1, rounds + 1):
        updates = []
        for s, data in enumerate(sites):
            model.load_trainable_state(global_state)
            proposal = Proposal(total_rounds=rounds, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs,
                                noise_multiplier=cfg.privacy.noise_multiplier, personalize_epochs=ft_epochs)
            res = train_site(cfg, model, data, simulated_policy(cfg, s), run_id="shift", server_round=r,
                             proposal=proposal, standardize=standardize,
                             local_head=cfg.personalization.kind == "local-head")
            st = model.trainable_state()
            if res.declined or check_state(st, model.expected_state()):
                continue
            updates.append((st, coarse_count(res.num_examples)))
        if updates:
            global_state = weighted_mean(cfg, updates)
        model.load_trainable_state(global_state)
        score = pooled_val_auc(model, evals)
        if verbose:
            print(f"round {r}: pooled site val AUC {score:.4f}", file=sys.stderr)
        if score > best:
            best, best_state, best_round = score, {k: v.clone() for k, v in global_state.items()}, r
    table = Personalization()
    for s, (data, ev) in enumerate(zip(sites, evals)):
        model.load_trainable_state(best_state)
        out = personalize_site(cfg, model, data, ev, simulated_policy(cfg, s), run_id="shift", epochs=ft_epochs or 1,
                               standardize=standardize, kind=cfg.personalization.kind)
        # through the reply a real site sends, and the server's validation of it
        _, parsed, reason = parse_personal_reply(personal_reply(
            out.figures, site=out.site, personalized=out.personalized, kept_tuned=out.kept_tuned,
            epsilon=out.epsilon, reason=out.reason))
        table.add(out.site, parsed, reason)
    per_site = {s: {"shift": shifts[i], "n_train": int(sites[i].labels.shape[0]),
                    "global_test_auc": _r(row["global_test_auc"]), "personal_test_auc": _r(row["personal_test_auc"]),
                    "tuned_test_auc": _r(row["tuned_test_auc"]), "kept": row["kept"], "epsilon": _r(row["epsilon"]),
                    "global_val_auc": _r(row["global_val_auc"]), "tuned_val_auc": _r(row["tuned_val_auc"]),
                    "val_n": row["global_val_n"], "test_n": row["global_test_n"],
                    "test_class_counts": np.bincount(evals[i].splits["test"][1].numpy(), minlength=2).tolist()}
                for i, (s, row) in enumerate(sorted(table.sites.items(), key=lambda kv: int(kv[0].split("-")[1])))}
    summary = {k: (_r(v) if isinstance(v, float) else v) for k, v in compare(table.sites).items()}
    return {"sites": n_sites, "rounds": rounds, "selected_round": best_round, "personalize_epochs": ft_epochs,
            "partitioner": cfg.data.partitioner, "eval_split": eval_split, "target_epsilon": cfg.privacy.target_epsilon,
            "per_site": per_site, **summary, "skipped": table.skipped,
            "feature_seconds": round(t_features, 1), "seconds": round(time.perf_counter() - t0, 1)}


def _r(x):
    return round(x, 4) if isinstance(x, float) and math.isfinite(x) else (None if isinstance(x, float) else x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--eval-split", choices=("iid", "like-train"), default="iid",
                   help="each site's val/test share: the data set's class mix (iid, default), or its training "
                        "partition's (like-train: under Dirichlet 0.5 a site's test share can hold a single image of "
                        "a class, and its AUC then ranks that one image)")
    p.add_argument("-v", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    overrides = {"data.path": DATA, "federation.rounds": 15, "personalization.kind": "finetune",
                 "personalization.epochs": 3, "privacy.randomness": "seeded", "federation.sites": args.sites}
    overrides.update(dict(parse_assignment(a) for a in args.set))
    with tempfile.TemporaryDirectory() as tmp:
        overrides.setdefault("output.state-dir", tmp)
        cfg = FedTLConfig().with_overrides(overrides)
        res = run(cfg, args.sites, args.eval_split, verbose=args.v)
    print(json.dumps({"overrides": {k: v for k, v in overrides.items() if k != "output.state-dir"}, **res}))


if __name__ == "__main__":
    main()
