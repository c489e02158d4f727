"""``fedtl site …``: a data site's own commands, offline: ``check`` (its site.toml, its images, its evaluation
split and its privacy plan) and ``ledger`` (its verified privacy ledger). They read, never write."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError, DataError


def _named(index: int, name: str) -> str:
    """``0 normal``; a class whose label is its index (a CSV of integer labels) is ``0``, not ``0 0``."""
    return str(index) if str(name) == str(index) else f"{index} {name}"


def cmd_site_check(args: argparse.Namespace) -> int:
    """Load a site's config and data offline; report classes, images read and every unreadable file."""
    from fedtl.data.site_sources import load_site_data
    from fedtl.site_config import SiteConfig

    for flag, value in (("--rounds", args.rounds), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}.")
    site = SiteConfig.load(args.config)
    missing = site.missing_files()
    print(f"site: {site.name} ({args.config})")
    print(f"data: {site.data.format} {site.data.path}" + (f" (labels {site.data.labels})" if site.data.labels else ""))
    for key, path in missing:
        print(f"missing file: `{key}` = {path}")
    result = load_site_data(site.data, allow_empty=True)
    kind = "RGB (colour kept)" if result.images.images.ndim == 4 else "grayscale"
    side = result.images.images.shape[1] if len(result.images) else site.data.image_size
    print(f"images read: {len(result.images)} of {result.listed} listed, {side}x{side} {kind}")
    for index, (name, count) in enumerate(result.class_counts().items()):
        print(f"  class {_named(index, name)}: {count}")
    print(f"unreadable: {len(result.problems)}")
    for problem in result.problems:
        print(f"  {problem.file}: {problem.reason}")
    eval_problems, training, eval_images = _check_evaluation(site, result)
    if len(result.images):
        _print_site_plan(site, result, training, args)
        from fedtl.federation.warm_up import cache_status

        print(cache_status(site, result.images, eval_images))
    if len(result.images) == 0:
        print(f"error: no image could be read from {site.data.path}; see the unreadable files above.", file=sys.stderr)
        return DataError.exit_code
    if missing:
        keys = ", ".join(f"`{key}`" for key, _ in missing)
        print(f"error: {len(missing)} configured file(s) do not exist ({keys}); fix the paths in {args.config}.", file=sys.stderr)
        return DataError.exit_code
    if (result.problems or eval_problems) and not args.allow_bad:
        what = " and ".join(([f"{len(result.problems)} of {result.listed} listed entries"] if result.problems else [])
                            + ([f"{eval_problems} entries of the evaluation set"] if eval_problems else []))
        print(f"error: {what} are unreadable (named above); fix them or remove them from the labels CSV, or pass "
              "--allow-bad to accept a site that skips them.", file=sys.stderr)
        return DataError.exit_code
    return 0


def _check_evaluation(site, train) -> tuple[int, int, object]:
    """Print the site's evaluation set: its images, and per class how many go to validation and test (the same
    stratified split the site makes, `fedtl.evaluation.stratified_split`); warn of a class a split will lack
    (its AUC is then undefined there). Returns the number of unreadable evaluation entries, of the images left to
    train on, and the separate evaluation images (None with a hold-out or without evaluation). Writes nothing."""
    import numpy as np

    from fedtl.data.site_sources import load_site_data
    from fedtl.evaluation import MIN_PER_CLASS, stratified_split
    from fedtl.federation.site_stats import MIN_STAT_IMAGES

    ev = site.evaluation
    if not ev.enabled:
        print("evaluation: none (the site answers evaluation requests with no figures)")
        return 0, len(train.images), None
    training, separate, splits = len(train.images), None, ()
    if ev.data is not None:
        held = load_site_data(ev.data, allow_empty=True)
        labels, names, problems, separate = held.images.labels, list(held.class_counts()), held.problems, held.images
        splits = held.splits
        print(f"evaluation: {ev.data.format} {ev.data.path}: {len(held.images)} of {held.listed} listed images read"
              + (f"; validation and test as its `{ev.data.split_column}` column says" if ev.data.split_column else ""))
    else:
        labels, names, problems = train.images.labels, list(train.class_counts()), []
        first, _ = stratified_split(labels, ev.holdout, 0)
        labels = labels[first]
        training -= len(labels)
        print(f"evaluation: {ev.holdout:.0%} of [data] held out of training: {len(labels)} images")
    print("  releases: n, AUC, accuracy and loss per split; " + (
        "the score histograms (binary) or prediction rows (multi-class) the federation's decision rule is chosen on"
        if ev.release_scores else "not the score histograms or prediction rows (release-scores = false)") + "; " + (
        f"to a server without data, the feature statistics of these images (sent with at least {MIN_STAT_IMAGES}; "
        f"{'it holds ' + str(len(labels)) if len(labels) >= MIN_STAT_IMAGES else 'it holds only ' + str(len(labels))})"
        if ev.release_statistics else "not the feature statistics (release-statistics = false)")
        + " (docs/privacy.md)")
    if splits:  # the CSV names each image's split: exactly what the site will use
        val, test = ([i for i, s in enumerate(splits) if s == part] for part in ("val", "test"))
    else:  # a preview: the site draws its own stratified split (stored) on first use
        val, test = stratified_split(labels, ev.validation_fraction, 0) if len(labels) else ([], [])
    counts = [(np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=len(names)) if len(labels) else
               np.zeros(len(names), int)) for part in (val, test)]
    for index, name in enumerate(names):
        print(f"  class {_named(index, name)}: {counts[0][index]} validation, {counts[1][index]} test")
    for split, c in zip(("validation", "test"), counts):
        absent = [_named(i, names[i]) for i in range(len(names)) if c[i] == 0]
        if absent:
            print(f"warning: the {split} split will hold no image of class {', '.join(absent)}: its AUC "
                  f"{'is undefined' if len(absent) >= len(names) - 1 else 'leaves that class out'} there "
                  "(more evaluation images of that class, or another validation-fraction, would fix it)")
    held = [i for i in range(len(names)) if counts[0][i] > 0]
    few = [_named(i, names[i]) for i in held if counts[0][i] < MIN_PER_CLASS]
    if site.privacy.max_personalize_epochs > 0 and (few or len(held) < 2):
        print(f"note: personalization would keep the global suffix here: weighing a personal one needs at least "
              f"{MIN_PER_CLASS} validation images of each class the split holds, and two classes"
              + (f" (fewer of class {', '.join(few)})" if few else "")
              + "; more evaluation images, or another validation-fraction, would fix it")
    if problems:
        print(f"evaluation unreadable: {len(problems)}")
        for problem in problems:
            print(f"  {problem.file}: {problem.reason}")
    return len(problems), training, separate


def _print_site_plan(site, result, n: int, args) -> None:
    """This site's privacy plan for a run of ``--rounds`` / ``--batch-size`` (default: the defaults), from its own
    policy and ledger (:func:`fedtl.planning.plan_own_site`); nothing is written."""
    from fedtl.federation.deployment import load_site_config, local_backbone_sha256
    from fedtl.planning import format_own_plan, plan_own_site
    from fedtl.privacy import PrivacyLedger, read_ledger
    from fedtl.privacy.ledger import check_identity
    from fedtl.privacy.policy import policy_for_site

    defaults = FedTLConfig()
    rounds, batch = args.rounds or defaults.federation.rounds, args.batch_size or defaults.train.batch_size
    policy = policy_for_site(site)
    path = Path(policy.ledger_path)
    if path.exists():
        ledger = read_ledger(path)  # its hash chain verified
        check_identity(ledger, path, site=site.name, delta=policy.delta, accountant=policy.accountant)  # as training
    else:
        ledger = PrivacyLedger(site.name, policy.delta, policy.accountant)
    params = None
    load_site_config(args.config)  # the site's own copy of the weights is looked up first, as when it trains
    if local_backbone_sha256(defaults.model.backbone):
        from fedtl.federation.site import build_transfer_model

        # graded classes: the server says so in a run (data.labels); here --graded, or a MedMNIST file's declaration
        graded = bool(getattr(args, "graded", False)) or defaults.graded_labels(site.data.path, result.num_classes)
        model = build_transfer_model(defaults.resolved(True, graded), max(result.num_classes, 2))
        params = model.param_counts()["trainable_params"]
    plan, notes = plan_own_site(policy, ledger, n, rounds=rounds, batch_size=batch, params=params)
    spent = ledger.epsilon()
    print(f"privacy plan for a run of {plan.rounds} rounds, batch {batch}, 1 local epoch (--rounds / --batch-size: "
          f"another), the default head-only suffix{' (ordinal head: --graded)' if getattr(args, 'graded', False) else ''}: "
          f"{n} training images; budget ε={policy.target_epsilon:g} at "
          f"δ={policy.delta:g} ({policy.accountant}), {spent:.2f} spent, per run ≤ {policy.run_cap:g}, per round ≤ "
          f"{policy.round_cap:g}, max σ {policy.max_noise_multiplier:g}")
    for line in format_own_plan(plan, notes, params, spent):
        print(line)


def cmd_site_ledger(args: argparse.Namespace) -> int:
    """Print a site's privacy ledger (verified) and its ε recomputed under both accountants."""
    from fedtl.privacy import read_ledger
    from fedtl.privacy.accounting import epsilon_of
    from fedtl.privacy.policy import policy_for_site
    from fedtl.site_config import SiteConfig

    site = SiteConfig.load(args.config)
    policy = policy_for_site(site)
    ledger = read_ledger(policy.ledger_path)  # verifies the hash chain and the anchor
    print(f"site: {site.name}  ledger: {policy.ledger_path}")
    print(f"policy: budget ε={policy.target_epsilon:g} at δ={policy.delta:g}, accountant {policy.accountant}, "
          f"per run ≤ {policy.run_cap:g}, per round ≤ {policy.round_cap:g}, max σ {policy.max_noise_multiplier:g}")
    print(f"ledger: δ={ledger.delta:g}, accountant {ledger.accountant}, {len(ledger.entries)} round(s), chain verified")
    print(f"{'#':>3} {'run':24} {'round':>5} {'sigma':>8} {'q':>8} {'steps':>6} {'eps after':>9}  time")
    import time as _time

    for i, e in enumerate(ledger.entries, 1):
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(e["time"]))
        print(f"{i:>3} {e['run'][:24]:24} {e['round']:>5} {e['noise_multiplier']:>8.3f} {e['sample_rate']:>8.4f} "
              f"{e['steps']:>6} {e['epsilon']:>9.4f}  {when}")
    history = ledger.history
    rdp = epsilon_of(history, ledger.delta, "rdp")
    prv = epsilon_of(history, ledger.delta, "prv")
    print(f"epsilon (recomputed from the history at δ={ledger.delta:g}): rdp {rdp:.4f}, prv {prv:.4f}; "
          f"budget {policy.target_epsilon:g}, remaining {max(0.0, policy.target_epsilon - (rdp if ledger.accountant == 'rdp' else prv)):.4f} "
          f"({ledger.accountant})")
    if args.json:
        print(json.dumps({"site": site.name, "entries": ledger.entries, "epsilon_rdp": rdp, "epsilon_prv": prv,
                          "delta": ledger.delta, "accountant": ledger.accountant, "budget": policy.target_epsilon}))
    return 0
