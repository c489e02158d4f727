"""The aggregation server's work: the round loop, checkpoints and the run directory (central evaluation and
model selection: :mod:`fedtl.federation.tracking`).

Run directory layout::

    config.json        the resolved configuration (flat kebab-case keys, as Flower's run config)
    metrics.jsonl      one JSON object per round (round 0 = the initial suffix)
    suffix.safetensors the selected round's suffix tensors (metadata: backbone, sha256, run, round)
    summary.json       headline figures; written last, so its presence means the run completed
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError, FederationError
from fedtl.federation.checkpoint import CHECKPOINT, Checkpoint
from fedtl.federation.distribution import ensure_backbone
from fedtl.federation.fedeval import evaluate_at_sites
from fedtl.federation.polling import destinations, send_and_receive
from fedtl.federation.records import record_bytes, to_record, to_state
from fedtl.federation.site import build_transfer_model, eval_features
from fedtl.federation.site_stats import (MIN_STAT_IMAGES, STATS_FILE, load_statistics, save_statistics,
                                         statistics_from_sites)
from fedtl.federation.strategy import RoundStats, SuffixFedAvg, make_strategy
from fedtl.federation.tracking import (EvaluationPlan, Tracker, jsonable, plan_evaluation, sites_auc,
                                      site_table)
from fedtl.model import TransferModel
from fedtl.standardize import first_linear

log = logging.getLogger(__name__)


RUN_FILES = ("summary.json", "metrics.jsonl", "suffix.safetensors", "config.json", "checkpoint.safetensors")


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the run directory; refuse one that already holds a run unless ``overwrite``.

    Overwriting removes the previous run's files and its simulated sites' ledgers (``sites/``):
    a new simulation starts with fresh budgets. Nothing else in the folder is touched.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`output.dir` {out} exists and is not a directory.")
    existing = [name for name in (*RUN_FILES, "sites") if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"Run directory {out} already holds a run ({', '.join(existing)}); choose another "
                          "output directory or pass --overwrite.")
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_server(grid: Grid, cfg: FedTLConfig, run_id: str, distribute_backbone: bool = True,
               demo_data: bool = False) -> dict:
    """Run the federation for ``cfg.federation.rounds`` rounds and write the run directory.

    Every completed round is checkpointed (``checkpoint.safetensors``); with ``output.resume`` the
    run continues from the last checkpoint of ``output.dir`` and ends with the same files.
    ``demo_data``: an empty ``data.path`` means the bundled PneumoniaMNIST (``fedtl simulate`` only).
    """
    t_start = time.perf_counter()
    plan = plan_evaluation(cfg, demo_data)  # validates the data before anything is written
    # the classes' names, when the operator gave them: each deployed site refuses a run whose names are not its own
    named_classes = {"class-names": cfg.model.class_names} if cfg.model.class_names else {}
    source = plan.source
    # model.pooling and model.head = auto: decided here, sent to every site with each request
    graded = cfg.graded_labels(getattr(source, "path", None), plan.num_classes)
    if cfg.model.head == "auto":
        why = "data.labels = graded" if cfg.data.labels == "graded" else "MedMNIST's task type for the server's data"
        log.info("model.head = auto: %s", f"the ordinal head (graded classes: {why})" if graded else
                 "the linear head (two classes)" if plan.num_classes == 2 else
                 "the linear head (no graded classes declared; set data.labels = graded if they are ordered grades: "
                 "--set data.labels=graded, or data.labels='graded' in flwr run --run-config)")
    out = Path(cfg.output.dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
    if not cfg.output.resume and any((out / name).exists() for name in (*RUN_FILES, CHECKPOINT)):
        raise ConfigError(f"Run directory {out} already holds a run; set `output.dir` to a new folder, or resume "
                          "an interrupted one with `output.resume=true`.")
    fed = cfg.federation
    transfer: dict = {}
    site_stats, backbone_sent, rich_model = None, False, None
    standardized_by = ""  # where the head's standardizing statistics came from (summary.json)
    if cfg.model.pooling == "auto" and source is None and cfg.standardizes:
        # no validation data to standardize the richer pooling with: the sites' evaluation images' statistics
        if cfg.output.resume:
            site_stats = load_statistics(out)
            standardized_by = f"the sites' evaluation images (kept in {STATS_FILE})"
        else:
            rich = cfg.resolved(has_reference=True, graded=graded)
            rich_model = build_transfer_model(rich, plan.num_classes)
            if distribute_backbone:  # the sites need the backbone to compute them
                ensure_backbone(grid, rich, rich_model.weights_sha256, fed.sites, timeout=fed.round_timeout,
                                report=transfer)
                backbone_sent = True
            naming = make_strategy(fed.aggregation, rich_model.expected_state(), sites=fed.sites)  # names the nodes
            site_stats, replies = statistics_from_sites(
                grid, naming, to_record(rich_model.trainable_state()),
                ConfigRecord({"num-classes": plan.num_classes, **named_classes, "backbone": rich.model.backbone,
                              "backbone-sha256": rich_model.weights_sha256, "pooling": rich.model.pooling,
                              "head": rich.model.head}), first_linear(rich_model).in_features, fed.round_timeout)
            if site_stats is not None:
                names = sorted(replies.sites)
                standardized_by = (f"the sites' evaluation images (median of {len(names)} site(s): "
                                   f"{', '.join(names[:10])}{', …' if len(names) > 10 else ''})")
        if site_stats is None:
            log.info("model.pooling = auto: the spatial mean of the feature maps. The server holds no validation data "
                     "and no site sent the statistics of its evaluation images, so there is nothing to standardize "
                     "the richer mean + std + quadrant pooling with, and unstandardized that trains worse than the "
                     "mean (docs/benchmarks.md, \"Without server data\"). Sites with at least %d evaluation images "
                     "and release-statistics on, or a labelled folder at evaluation.data-path, give the server "
                     "statistics.",
                     MIN_STAT_IMAGES)
    cfg = cfg.resolved(has_reference=source is not None or site_stats is not None, graded=graded)
    # with the sites' statistics the run trains the model the statistics were asked for (the same resolved config)
    model = (rich_model if site_stats is not None and rich_model is not None
             else build_transfer_model(cfg, plan.num_classes))
    val = test = None
    val_hit = test_hit = True
    if source is not None:
        val_f, val_hit = eval_features(cfg, model, source.val)  # (N, K, D) with test-time views
        test_f, test_hit = eval_features(cfg, model, source.test)
        val, test = (val_f, torch.as_tensor(source.val.labels)), (test_f, torch.as_tensor(source.test.labels))
    strategy = make_strategy(
        fed.aggregation, model.expected_state(), max_hostile=fed.max_hostile, sites=fed.sites,
        update_clip=fed.update_clip, weight_cap=fed.weight_cap, weighting=fed.weighting, fraction_train=fed.fraction_train,
        min_train_nodes=fed.min_sites, min_available_nodes=fed.min_sites,  # the round loop waits (bounded)
    )
    eval_config = ConfigRecord({"num-classes": plan.num_classes, **named_classes, "backbone": cfg.model.backbone,
                                "backbone-sha256": model.weights_sha256, "pooling": cfg.model.pooling,
                                "head": cfg.model.head})

    def site_eval(rnd: int, arrays: ArrayRecord):
        return evaluate_at_sites(grid, strategy, rnd, arrays, eval_config, fed.round_timeout, plan.num_classes)

    tracker = Tracker(model, val, test, strategy, out / "metrics.jsonl",
                      site_eval=site_eval if plan.sites == "every-round" else None, select_by=plan.select_by,
                      decision_mode=cfg.evaluation.decision, num_classes=plan.num_classes,
                      total_rounds=fed.rounds)  # pooled figures: their own cap (4 × the median n)
    if cfg.output.resume:
        ckpt = load_for_resume(out, cfg)
        ckpt.resumed_after.append(ckpt.round)  # kept with the next checkpoint, and in summary.json and the report
        fedtl_run, start = ckpt.run_id, ckpt.round + 1
        tracker.restore(ckpt)
        arrays = to_record(ckpt.global_state)
        log.warning("Resuming run %s in %s after round %d of %d.", fedtl_run, out, ckpt.round, fed.rounds)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if site_stats is not None:
            save_statistics(out, site_stats)  # what a resumed run trains with again
        (out / "config.json").write_text(json.dumps(cfg.to_run_config(), indent=1, sort_keys=True))
        fedtl_run, start = str(run_id), 1
        arrays = to_record(model.trainable_state())
        tracker(0, arrays)
        ckpt = Checkpoint(round=0, run_id=fedtl_run, config=cfg.to_run_config(), global_state=to_state(arrays))
        _checkpoint(ckpt, tracker, arrays, 0, out)
    log.info("Evaluation: server data: %s; sites: %s; rounds selected by %s validation.", plan.data, plan.sites,
             plan.select_by)
    if distribute_backbone and not backbone_sent:
        ensure_backbone(grid, cfg, model.weights_sha256, fed.sites, timeout=fed.round_timeout, report=transfer)
    stats = site_stats.to_config() if site_stats is not None else feature_statistics(cfg, val, model)
    if site_stats is None:
        standardized_by = (f"the server's validation split ({val[0].shape[0]} images)" if stats and val is not None
                           else "none (the head reads raw features)")
    train_config = ConfigRecord({"total-rounds": fed.rounds, "run-id": fedtl_run, "num-classes": plan.num_classes,
                                 **named_classes,
                                 "backbone": cfg.model.backbone, "backbone-sha256": model.weights_sha256,
                                 "noise-multiplier": cfg.privacy.noise_multiplier,
                                 "personalize-epochs": cfg.personalization.requested_epochs,
                                 "local-head": int(cfg.personalization.kind == "local-head"),
                                 "pooling": cfg.model.pooling, "head": cfg.model.head, "reply-within": fed.round_timeout,
                                 **stats})
    eval_config["run-id"] = fedtl_run
    for rnd in range(start, fed.rounds + 1):
        replies = _train_round(grid, strategy, rnd, arrays, train_config, fed, out)
        aggregated, _ = strategy.aggregate_train(rnd, replies)
        if aggregated is not None:
            arrays = aggregated
        tracker(rnd, arrays)
        _checkpoint(ckpt, tracker, arrays, rnd, out)
    if tracker.best_round < 0:
        raise FederationError("No round produced a global model; see the log for the sites' reasons.")
    per_site = site_table(tracker, plan, site_eval)
    personal = None
    if cfg.personalization.kind != "none":  # after the last round: the sites fine-tune the selected suffix
        from fedtl.federation.personalize import personalize_at_sites

        personal = personalize_at_sites(grid, strategy, to_record(tracker.best_state), ConfigRecord({
            "run-id": fedtl_run, "kind": cfg.personalization.kind, "epochs": cfg.personalization.epochs,
            "num-classes": plan.num_classes, **named_classes,
            "backbone-sha256": model.weights_sha256, "pooling": cfg.model.pooling, "head": cfg.model.head,
            **stats}),
            fed.round_timeout).table()
        personal = {"kind": cfg.personalization.kind, **personal}
    summary = _finish(cfg, out, model, tracker, to_record(model.trainable_state()), t_start, val_hit and test_hit,
                      transfer, plan, per_site, personal, run_id=fedtl_run, standardized_by=standardized_by,
                      resumed_after=ckpt.resumed_after)
    if not demo_data:  # a deployed run: its report beside summary.json (`fedtl simulate` writes its own at the end)
        write_run_report(out)
    return summary


def write_run_report(out: Path) -> Path | None:
    """``out/report.html``; a report that cannot be written is logged, never fails the finished run."""
    from fedtl.report import write_report

    try:
        path = write_report(out)
    except Exception as exc:  # noqa: BLE001 - the run's files are written; the report is a view of them
        log.warning("The report was not written (%s); `fedtl report %s` writes it from the run's files.", exc, out)
        return None
    log.info("Report: %s", path)
    return path


def feature_statistics(cfg: FedTLConfig, val: tuple[torch.Tensor, torch.Tensor] | None,
                       model: TransferModel) -> dict[str, list[float]]:
    """The request entries that let sites train on standardized features (``train.standardize``,
    :mod:`fedtl.standardize`): per-dimension mean and scale of the server's validation features; none when the
    run does not standardize or the server has no validation data (logged)."""
    from fedtl.standardize import server_standardizer

    if not cfg.standardizes:
        return {}
    stats = server_standardizer(cfg, val[0] if val is not None else None, model)
    if stats is None:
        if cfg.model.pooling != "avg":
            log.warning("train.standardize = server, but the server has no validation data: sites train the head on "
                        "raw features, and with model.pooling = %s that trains worse than with standardized ones "
                        "(docs/benchmarks.md, \"Richer pooling with standardized training\"). Give the server "
                        "validation data, or set model.pooling = avg (or auto).", cfg.model.pooling)
        return {}
    log.info("Sites train the head on %d features standardized with the statistics of the server's %d validation "
             "images (train.standardize = server).", stats.dim, val[0].shape[0])
    return stats.to_config()


def _train_round(grid: Grid, strategy: SuffixFedAvg, rnd: int, arrays: ArrayRecord, train_config: ConfigRecord,
                 fed, out: Path) -> list:
    """Send round ``rnd`` and collect replies until a quorum answers; retry, then stop resumably.

    Never waits without bound: each attempt waits at most ``round-timeout`` for sites to connect
    and again for their replies. Sites asked again for a round they already trained return the
    update they released (no second spend, see ``fedtl.federation.site``).
    """
    stats = strategy.rounds.setdefault(rnd, RoundStats())
    attempts = fed.round_retries + 1
    for attempt in range(1, attempts + 1):
        nodes = _wait_for_nodes(grid, fed.sites, fed.round_timeout, rnd)
        connected = len(nodes)
        here = {strategy.node_sites[n] for n in nodes if n in strategy.node_sites}
        stats.not_connected = sorted({name for n, name in strategy.node_sites.items() if n not in nodes} - here)
        missing = f" (not connected: {', '.join(stats.not_connected)})" if stats.not_connected else ""
        if connected < fed.min_sites:
            log.warning("Round %d, attempt %d/%d: %d of %d sites connected within %.0f s (quorum %d)%s.", rnd, attempt,
                        attempts, connected, fed.sites, fed.round_timeout, fed.min_sites, missing)
            continue
        if connected < fed.sites:
            log.warning("Round %d: going ahead with %d of %d sites after waiting %.0f s (federation.round-timeout) for "
                        "the rest%s.", rnd, connected, fed.sites, fed.round_timeout, missing)
        messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        replies = send_and_receive(grid, messages, timeout=fed.round_timeout)  # polled every 0.2 s, not 3 s
        strategy.sent_to = destinations(messages)  # replies are matched to sites by the message they answer
        sent = {m.metadata.dst_node_id for m in messages}
        replied = {strategy.reply_node(r) for r in replies}
        answered = {strategy.reply_node(r) for r in replies if not r.has_error()}
        stats.timed_out = sorted(strategy.site_name(n) for n in sent - replied)
        stats.attempts = attempt
        if len(answered) >= fed.min_sites:
            if stats.timed_out:
                log.warning("Round %d: no reply within %.0f s from %s; going on with %d.", rnd, fed.round_timeout,
                            ", ".join(stats.timed_out), len(answered))
            return replies
        log.warning("Round %d, attempt %d/%d: %d of %d sites replied within %.0f s (quorum %d).", rnd, attempt, attempts,
                    len(answered), len(sent), fed.round_timeout, fed.min_sites)
    raise FederationError(
        f"Round {rnd}: fewer than {fed.min_sites} site(s) (federation.min-sites) replied within "
        f"{fed.round_timeout:.0f} s in {attempts} attempt(s); the run stopped after round {rnd - 1}. "
        f"{resume_hint(out)}")


def resume_hint(out: Path) -> str:
    return (f"Its checkpoint is in {out}: resume with `fedtl simulate --resume {out}`, or in a deployment "
            f"`flwr run . <federation> --run-config \"output.dir='{out}' output.resume=true\"`.")


WAIT_NOTICE_S = 5.0  # a round still waiting for sites after this long says so (once)


def _wait_for_nodes(grid: Grid, expected: int, timeout: float, rnd: int = 0) -> set[int]:
    """Wait (at most ``timeout``) for every expected site; return the connected nodes. A wait longer than
    :data:`WAIT_NOTICE_S` is said once (a resumed run waiting for a site that is down sat silent for minutes)."""
    start = time.monotonic()
    said = False
    while True:
        nodes = set(grid.get_node_ids())
        waited = time.monotonic() - start
        if len(nodes) >= expected or waited > timeout:
            return nodes
        if not said and waited > WAIT_NOTICE_S:
            log.info("Round %d: %d of %d sites connected; waiting up to %.0f s more for the rest "
                     "(federation.round-timeout).", rnd, len(nodes), expected, timeout - waited)
            said = True
        time.sleep(0.5)


def _checkpoint(ckpt: Checkpoint, tracker: Tracker, arrays: ArrayRecord, rnd: int, out: Path) -> None:
    t0 = time.perf_counter()
    ckpt.round = rnd
    ckpt.global_state = to_state(arrays)
    ckpt.best_state, ckpt.best_round, ckpt.best_score = tracker.best_state, tracker.best_round, tracker.best_score
    ckpt.selection_metric = tracker.selection_metric or "val_auc"
    ckpt.history, ckpt.privacy = tracker.history, tracker.last_privacy
    ckpt.best_eval = tracker.best_eval.val_releases() if tracker.best_eval is not None else {}
    size = ckpt.save(out)
    log.debug("Checkpoint of round %d: %d bytes in %.1f ms", rnd, size, 1000 * (time.perf_counter() - t0))


def load_for_resume(out: Path, cfg: FedTLConfig) -> Checkpoint:
    """The checkpoint of an interrupted run in ``out``, after checking it is the same run."""
    if (out / "summary.json").exists():
        raise ConfigError(f"Run directory {out} holds a completed run (summary.json); there is nothing to resume.")
    ckpt = Checkpoint.load(out)
    mine = {k: v for k, v in cfg.to_run_config().items() if not k.startswith("output.")}
    # a key the run's fedtl did not know yet (added since) is compared at its default, which is what the run had
    known = {**FedTLConfig().to_run_config(), **ckpt.config}
    theirs = {k: v for k, v in known.items() if not k.startswith("output.")}
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        raise ConfigError(f"Cannot resume {out}: the configuration differs from the interrupted run's in "
                          f"{', '.join(changed)}. Resume with the run's own config.json.")
    return ckpt


def _finish(cfg: FedTLConfig, out: Path, model: TransferModel, tracker: Tracker, initial: ArrayRecord,
            t_start: float, server_cache_hit: bool, transfer: dict | None, plan: EvaluationPlan,
            per_site: dict | None, personalization: dict | None = None, run_id: str = "",
            standardized_by: str = "", resumed_after: list[int] | None = None) -> dict:
    fed = cfg.federation
    best = tracker.history[tracker.best_round]
    final = tracker.history[-1]
    rounds = [r for r in tracker.history if r["round"] > 0]
    counts = model.param_counts()
    decision = tracker.best_decision
    save_file({k: v.contiguous() for k, v in tracker.best_state.items()}, out / "suffix.safetensors",
              metadata={"backbone": cfg.model.backbone, "weights_sha256": model.weights_sha256, "run": str(run_id),
                        "round": str(tracker.best_round), "split": model.split_name,
                        "num_classes": str(plan.num_classes), **decision.to_metadata()})
    dp = cfg.privacy.enabled or bool(tracker.last_privacy)  # deployed sites always report their DP spend
    # headline figures: the server's test data when it has any, else the sites' pooled test figures
    pre = "" if plan.source is not None else "fed_"
    pooled_test = (per_site or {}).get("pooled", {})
    headline = {k: best.get(pre + k, pooled_test.get(k, float("nan")) if pre else float("nan"))
                for k in ("test_auc", "test_acc", "test_acc_argmax", "val_auc", "val_acc", "val_loss")}
    if pre:  # AUCs over all the sites' images (the validation one the round was selected by), not means of theirs
        for split in ("val", "test"):
            headline[f"{split}_auc"] = sites_auc(best, split) if f"fed_{split}_auc" in best else \
                sites_auc(pooled_test, split, "")
    summary = {
        **headline,
        "run_id": str(run_id),  # what sites' personal suffixes name in their metadata (`fedtl predict --suffix`)
        "selected_round": tracker.best_round, "selection_metric": tracker.selection_metric,
        "evaluation": {"server_data": plan.data, "sites": plan.sites, "selected_by": plan.select_by,
                       "headline": "central test split" if plan.source is not None else "sites' pooled test splits",
                       "pooling": cfg.model.pooling, "standardized_by": standardized_by},
        "decision": decision.to_dict(),
        "per_site": per_site,
        "personalization": personalization,  # each site's figures under the global vs its personal suffix
        "final_round_test_auc": (sites_auc(final, "test") if pre else final.get("test_auc", float("nan"))),
        "final_round_test_acc": final.get(pre + "test_acc", float("nan")),
        "rounds": fed.rounds, "sites": fed.sites, "num_classes": plan.num_classes,
        "dp": dp,
        "epsilon": {k: v["epsilon"] for k, v in sorted(tracker.last_privacy.items())} if dp else {},
        "epsilon_max": max((v["epsilon"] for v in tracker.last_privacy.values()), default=0.0) if dp else None,
        "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.enabled else None,
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        # each site's ε, δ, accountant and budget as that site reported them (a deployed site's own policy)
        "privacy": dict(sorted(tracker.last_privacy.items())),
        "accountants": sorted({p["accountant"] for p in tracker.last_privacy.values()}),
        "randomness": cfg.privacy.randomness,
        "bytes_up_per_round": _mean(r.get("bytes_up", 0) for r in rounds),
        "bytes_down_per_round": _mean(r.get("bytes_down", 0) for r in rounds),
        "bytes_per_site_round": record_bytes(initial),
        "full_model_bytes": counts["full_model_bytes"],
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "backbone": cfg.model.backbone, "weights_sha256": model.weights_sha256, "split_after": model.split_name,
        "wall_seconds": round(time.perf_counter() - t_start, 2),  # this process's (after a resume: since it)
        "resumed_after_rounds": list(resumed_after or []),  # the rounds after which the run stopped and was resumed
        "cache_hit": bool(server_cache_hit),  # the server's own; fedtl simulate adds the sites'
        "declined": {str(k): v for r in rounds for k, v in r.get("declined", {}).items()},
        "rejected_updates": sum(len(r.get("rejected", {})) for r in rounds),
        "timed_out": {str(r["round"]): r["timed_out"] for r in rounds if r.get("timed_out")},
        "not_connected": {str(r["round"]): r["not_connected"] for r in rounds if r.get("not_connected")},
        # sites that sent no figures for a round's federated evaluation (site -> why), and those that timed out
        "eval_skipped": {str(r["round"]): r["eval_skipped"] for r in rounds if r.get("eval_skipped")},
        "eval_timed_out": {str(r["round"]): r["eval_timed_out"] for r in rounds if r.get("eval_timed_out")},
        "failed": {str(r["round"]): r["failed"] for r in rounds if r.get("failed")},  # site -> Flower's error
        "aggregation": fed.aggregation,
        "rejected": {str(r["round"]): r["rejected"] for r in rounds if r.get("rejected")},
        "backbone_transfer": transfer or None,  # weights sent to sites lacking them: bytes, sites, seconds
    }
    summary["bytes_per_site_round_fraction_of_model"] = summary["bytes_per_site_round"] / summary["full_model_bytes"]
    _write_json(out / "summary.json", summary)
    log.info("Run directory: %s | selected round %d (by %s %s): test AUC %.4f, acc %.4f (%s)", out,
             tracker.best_round, plan.select_by, tracker.selection_metric, summary["test_auc"], summary["test_acc"],
             summary["evaluation"]["headline"])
    return summary


def _mean(values) -> float:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else 0.0


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jsonable(body), indent=1))
    tmp.replace(path)
