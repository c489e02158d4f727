"""The aggregation server's work: central evaluation, model selection and the run directory.

Run directory layout::

    config.json        the resolved configuration (flat kebab-case keys, as Flower's run config)
    metrics.jsonl      one JSON object per round (round 0 = the initial suffix)
    suffix.safetensors the selected round's suffix tensors (metadata: backbone, sha256, round)
    summary.json       headline figures; written last, so its presence means the run completed
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError, FederationError
from fedtl.federation.checkpoint import CHECKPOINT, Checkpoint
from fedtl.federation.distribution import ensure_backbone
from fedtl.federation.polling import send_and_receive
from fedtl.federation.records import record_bytes, to_record, to_state
from fedtl.federation.site import build_transfer_model, cached_features, load_source
from fedtl.federation.strategy import RoundStats, SuffixFedAvg, make_strategy
from fedtl.model import TransferModel
from fedtl.training import evaluate_suffix

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


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value))


@dataclass
class Tracker:
    """Central evaluation each round; keeps the round with the best validation AUC.

    Validation AUC is undefined (NaN) when the validation split holds a single class; the round
    is then selected by the lowest validation loss instead, logged once and recorded as
    ``selection_metric``. A round whose figure is undefined never beats a defined one, and the
    first trained round is kept until a better one comes: a run that trained always has a model.
    """

    model: TransferModel
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    strategy: SuffixFedAvg
    metrics_path: Path
    best_round: int = -1
    best_score: float = -math.inf  # val AUC, or minus val loss under the fallback; higher is better
    selection_metric: str | None = None  # "val_auc" | "val_loss", fixed by the first evaluation
    best_state: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    last_epsilon: dict[str, float] = field(default_factory=dict)
    last_privacy: dict[str, dict] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def restore(self, ckpt) -> None:
        """Continue from a checkpoint; ``metrics.jsonl`` is rewritten to its rounds (each round once)."""
        self.history = list(ckpt.history)
        self.best_round, self.best_score = ckpt.best_round, ckpt.best_score
        self.selection_metric = ckpt.selection_metric
        self.best_state = dict(ckpt.best_state)
        self.last_privacy = dict(ckpt.privacy)
        self.last_epsilon = {k: v["epsilon"] for k, v in self.last_privacy.items()}
        body = "".join(json.dumps(row, default=_json_default) + "\n" for row in self.history)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(self.metrics_path)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = to_state(arrays)
        self.model.load_trainable_state(state)
        v = evaluate_suffix(self.model, *self.val)
        t = evaluate_suffix(self.model, *self.test)
        stats = self.strategy.rounds.get(server_round)
        row = {"round": server_round, "val_auc": v.auc, "val_acc": v.accuracy, "val_loss": v.loss,
               "test_auc": t.auc, "test_acc": t.accuracy, "test_loss": t.loss,
               "seconds": round(time.perf_counter() - self.t0, 3)}
        if stats is not None:
            self.last_epsilon.update(stats.epsilon)
            self.last_privacy.update(stats.privacy)
            row.update({"bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "sites_trained": sorted(stats.trained),
                        "declined": stats.declined, "rejected": stats.rejected, "failed": stats.failed,
                        "timed_out": stats.timed_out, "attempts": stats.attempts, "bounded": stats.bounded,
                        "epsilon": dict(sorted(stats.epsilon.items())),
                        "privacy": dict(sorted(stats.privacy.items()))})
        self.history.append(row)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if self.selection_metric is None:
            self.selection_metric = "val_auc" if math.isfinite(v.auc) else "val_loss"
            if self.selection_metric == "val_loss":
                classes = sorted({int(c) for c in self.val[1].tolist()})
                log.warning("Validation AUC is undefined (the validation split holds %d example(s) of class(es) %s only); "
                            "selecting the round by the lowest validation loss instead.", len(self.val[1]), classes)
        score = v.auc if self.selection_metric == "val_auc" else -v.loss
        score = score if math.isfinite(score) else -math.inf
        if server_round > 0 and (self.best_round < 0 or score > self.best_score):
            self.best_round, self.best_score = server_round, score
            self.best_state = {k: x.clone() for k, x in state.items()}
        log.info("Round %d: val AUC %.4f acc %.4f | test AUC %.4f acc %.4f", server_round, v.auc, v.accuracy, t.auc, t.accuracy)
        return MetricRecord({"val-auc": v.auc, "val-acc": v.accuracy, "test-auc": t.auc, "test-acc": t.accuracy})


def run_server(grid: Grid, cfg: FedTLConfig, run_id: str, distribute_backbone: bool = True) -> dict:
    """Run the federation for ``cfg.federation.rounds`` rounds and write the run directory.

    Every completed round is checkpointed (``checkpoint.safetensors``); with ``output.resume`` the
    run continues from the last checkpoint of ``output.dir`` and ends with the same files.
    """
    t_start = time.perf_counter()
    source = load_source(cfg.data.path)  # validates the data before anything is written
    model = build_transfer_model(cfg, source.num_classes)
    val_f, val_hit = cached_features(cfg, model, source.val)
    test_f, test_hit = cached_features(cfg, model, source.test)
    out = Path(cfg.output.dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
    fed = cfg.federation
    strategy = make_strategy(
        fed.aggregation, model.expected_state(), max_hostile=fed.max_hostile, sites=fed.sites,
        update_clip=fed.update_clip, weight_cap=fed.weight_cap, fraction_train=fed.fraction_train,
        min_train_nodes=fed.min_sites, min_available_nodes=fed.min_sites,  # the round loop waits (bounded)
    )
    tracker = Tracker(model, (val_f, torch.as_tensor(source.val.labels)), (test_f, torch.as_tensor(source.test.labels)),
                      strategy, out / "metrics.jsonl")
    if cfg.output.resume:
        ckpt = load_for_resume(out, cfg)
        fedtl_run, start = ckpt.run_id, ckpt.round + 1
        tracker.restore(ckpt)
        arrays = to_record(ckpt.global_state)
        log.warning("Resuming run %s in %s after round %d of %d.", fedtl_run, out, ckpt.round, fed.rounds)
    else:
        if any((out / name).exists() for name in (*RUN_FILES, CHECKPOINT)):
            raise ConfigError(f"Run directory {out} already holds a run; set `output.dir` to a new folder, or resume "
                              "an interrupted one with `output.resume=true`.")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_run_config(), indent=1, sort_keys=True))
        fedtl_run, start = str(run_id), 1
        arrays = to_record(model.trainable_state())
        tracker(0, arrays)
        ckpt = Checkpoint(round=0, run_id=fedtl_run, config=cfg.to_run_config(), global_state=to_state(arrays))
        _checkpoint(ckpt, tracker, arrays, 0, out)
    transfer: dict = {}
    if distribute_backbone:
        ensure_backbone(grid, cfg, model.weights_sha256, fed.sites, timeout=fed.round_timeout, report=transfer)
    train_config = ConfigRecord({"total-rounds": fed.rounds, "run-id": fedtl_run, "num-classes": source.num_classes,
                                 "backbone": cfg.model.backbone, "backbone-sha256": model.weights_sha256,
                                 "noise-multiplier": cfg.privacy.noise_multiplier})
    for rnd in range(start, fed.rounds + 1):
        replies = _train_round(grid, strategy, rnd, arrays, train_config, fed, out)
        aggregated, _ = strategy.aggregate_train(rnd, replies)
        if aggregated is not None:
            arrays = aggregated
        tracker(rnd, arrays)
        _checkpoint(ckpt, tracker, arrays, rnd, out)
    if tracker.best_round < 0:
        raise FederationError("No round produced a global model; see the log for the sites' reasons.")
    return _finish(cfg, out, model, tracker, to_record(model.trainable_state()), t_start, val_hit and test_hit,
                   transfer)


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
        connected = _wait_for_nodes(grid, fed.sites, fed.min_sites, fed.round_timeout)
        if connected < fed.min_sites:
            log.warning("Round %d, attempt %d/%d: %d of %d sites connected within %.0f s (quorum %d).", rnd, attempt,
                        attempts, connected, fed.sites, fed.round_timeout, fed.min_sites)
            continue
        messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        replies = send_and_receive(grid, messages, timeout=fed.round_timeout)  # polled every 0.2 s, not 3 s
        sent = {m.metadata.dst_node_id for m in messages}
        answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
        stats.timed_out = sorted(strategy.site_name(n) for n in sent - {r.metadata.src_node_id for r in replies})
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


def _wait_for_nodes(grid: Grid, expected: int, quorum: int, timeout: float) -> int:
    """Wait (at most ``timeout``) for every expected site; return how many are connected."""
    deadline = time.monotonic() + timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def _checkpoint(ckpt: Checkpoint, tracker: Tracker, arrays: ArrayRecord, rnd: int, out: Path) -> None:
    t0 = time.perf_counter()
    ckpt.round = rnd
    ckpt.global_state = to_state(arrays)
    ckpt.best_state, ckpt.best_round, ckpt.best_score = tracker.best_state, tracker.best_round, tracker.best_score
    ckpt.selection_metric = tracker.selection_metric or "val_auc"
    ckpt.history, ckpt.privacy = tracker.history, tracker.last_privacy
    size = ckpt.save(out)
    log.debug("Checkpoint of round %d: %d bytes in %.1f ms", rnd, size, 1000 * (time.perf_counter() - t0))


def load_for_resume(out: Path, cfg: FedTLConfig) -> Checkpoint:
    """The checkpoint of an interrupted run in ``out``, after checking it is the same run."""
    if (out / "summary.json").exists():
        raise ConfigError(f"Run directory {out} holds a completed run (summary.json); there is nothing to resume.")
    ckpt = Checkpoint.load(out)
    mine = {k: v for k, v in cfg.to_run_config().items() if not k.startswith("output.")}
    theirs = {k: v for k, v in ckpt.config.items() if not k.startswith("output.")}
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        raise ConfigError(f"Cannot resume {out}: the configuration differs from the interrupted run's in "
                          f"{', '.join(changed)}. Resume with the run's own config.json.")
    return ckpt


def _finish(cfg: FedTLConfig, out: Path, model: TransferModel, tracker: Tracker, initial: ArrayRecord,
            t_start: float, server_cache_hit: bool, transfer: dict | None = None) -> dict:
    fed = cfg.federation
    best = tracker.history[tracker.best_round]
    final = tracker.history[-1]
    rounds = [r for r in tracker.history if r["round"] > 0]
    counts = model.param_counts()
    save_file({k: v.contiguous() for k, v in tracker.best_state.items()}, out / "suffix.safetensors",
              metadata={"backbone": cfg.model.backbone, "weights_sha256": model.weights_sha256,
                        "round": str(tracker.best_round), "split": model.split_name})
    dp = cfg.privacy.enabled or bool(tracker.last_privacy)  # deployed sites always report their DP spend
    summary = {
        "test_auc": best["test_auc"], "test_acc": best["test_acc"],
        "val_auc": best["val_auc"], "val_acc": best["val_acc"], "val_loss": best["val_loss"],
        "selected_round": tracker.best_round, "selection_metric": tracker.selection_metric,
        "final_round_test_auc": final["test_auc"], "final_round_test_acc": final["test_acc"],
        "rounds": fed.rounds, "sites": fed.sites,
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
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "cache_hit": bool(server_cache_hit),  # the server's own; fedtl simulate adds the sites'
        "declined": {str(k): v for r in rounds for k, v in r.get("declined", {}).items()},
        "rejected_updates": sum(len(r.get("rejected", {})) for r in rounds),
        "timed_out": {str(r["round"]): r["timed_out"] for r in rounds if r.get("timed_out")},
        "aggregation": fed.aggregation,
        "rejected": {str(r["round"]): r["rejected"] for r in rounds if r.get("rejected")},
        "backbone_transfer": transfer or None,  # weights sent to sites lacking them: bytes, sites, seconds
    }
    summary["bytes_per_site_round_fraction_of_model"] = summary["bytes_per_site_round"] / summary["full_model_bytes"]
    _write_json(out / "summary.json", summary)
    log.info("Run directory: %s | selected round %d (by %s): test AUC %.4f, acc %.4f", out, tracker.best_round,
             tracker.selection_metric, summary["test_auc"], summary["test_acc"])
    return summary


def _mean(values) -> float:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else 0.0


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=_json_default))
    tmp.replace(path)
