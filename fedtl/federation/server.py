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
from fedtl.federation.records import record_bytes, to_record, to_state
from fedtl.federation.site import build_transfer_model, cached_features, load_source
from fedtl.federation.strategy import SuffixFedAvg
from fedtl.model import TransferModel
from fedtl.training import evaluate_suffix

log = logging.getLogger(__name__)


RUN_FILES = ("summary.json", "metrics.jsonl", "suffix.safetensors", "config.json")


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
    """Central evaluation each round; keeps the round with the best validation AUC."""

    model: TransferModel
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    strategy: SuffixFedAvg
    metrics_path: Path
    best_round: int = -1
    best_val_auc: float = -math.inf
    best_state: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    last_epsilon: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

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
            row.update({"bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "sites_trained": sorted(stats.trained),
                        "declined": stats.declined, "rejected": stats.rejected, "failed": stats.failed,
                        "epsilon": dict(sorted(stats.epsilon.items()))})
        self.history.append(row)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if server_round > 0 and v.auc > self.best_val_auc:
            self.best_round, self.best_val_auc = server_round, v.auc
            self.best_state = {k: x.clone() for k, x in state.items()}
        log.info("Round %d: val AUC %.4f acc %.4f | test AUC %.4f acc %.4f", server_round, v.auc, v.accuracy, t.auc, t.accuracy)
        return MetricRecord({"val-auc": v.auc, "val-acc": v.accuracy, "test-auc": t.auc, "test-acc": t.accuracy})


def run_server(grid: Grid, cfg: FedTLConfig, run_id: str, distribute_backbone: bool = True) -> dict:
    """Run the federation for ``cfg.federation.rounds`` rounds and write the run directory."""
    t_start = time.perf_counter()
    source = load_source(cfg.data.path)  # validates the data before anything is written
    model = build_transfer_model(cfg, source.num_classes)
    val_f, val_hit = cached_features(cfg, model, source.val)
    test_f, test_hit = cached_features(cfg, model, source.test)
    out = Path(cfg.output.dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
    if any((out / name).exists() for name in RUN_FILES):
        raise ConfigError(f"Run directory {out} already holds a run; set `output.dir` to a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_run_config(), indent=1, sort_keys=True))

    fed = cfg.federation
    strategy = SuffixFedAvg(
        expected=model.expected_state(), fraction_train=fed.fraction_train, min_train_nodes=fed.min_sites,
        min_available_nodes=fed.sites,
    )
    tracker = Tracker(model, (val_f, torch.as_tensor(source.val.labels)), (test_f, torch.as_tensor(source.test.labels)),
                      strategy, out / "metrics.jsonl")
    initial = to_record(model.trainable_state())
    transfer: dict = {}
    if distribute_backbone:
        ensure_backbone(grid, cfg, model.weights_sha256, fed.sites, report=transfer)
    train_config = ConfigRecord({"total-rounds": fed.rounds, "run-id": str(run_id), "num-classes": source.num_classes,
                                 "backbone": cfg.model.backbone, "backbone-sha256": model.weights_sha256})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=fed.rounds, train_config=train_config,
                   evaluate_fn=tracker)
    if tracker.best_round < 0:
        raise FederationError("No round produced a global model; see the log for the sites' reasons.")

    best = tracker.history[tracker.best_round]
    final = tracker.history[-1]
    rounds = [r for r in tracker.history if r["round"] > 0]
    counts = model.param_counts()
    save_file({k: v.contiguous() for k, v in tracker.best_state.items()}, out / "suffix.safetensors",
              metadata={"backbone": cfg.model.backbone, "weights_sha256": model.weights_sha256,
                        "round": str(tracker.best_round), "split": model.split_name})
    sites_cache = all(s.cache_hit for s in strategy.rounds.values())
    summary = {
        "test_auc": best["test_auc"], "test_acc": best["test_acc"],
        "val_auc": best["val_auc"], "val_acc": best["val_acc"],
        "selected_round": tracker.best_round,
        "final_round_test_auc": final["test_auc"], "final_round_test_acc": final["test_acc"],
        "rounds": fed.rounds, "sites": fed.sites,
        "dp": cfg.privacy.enabled,
        "epsilon": dict(sorted(tracker.last_epsilon.items())) if cfg.privacy.enabled else {},
        "epsilon_max": max(tracker.last_epsilon.values(), default=0.0) if cfg.privacy.enabled else None,
        "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.enabled else None,
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        "bytes_up_per_round": _mean(r.get("bytes_up", 0) for r in rounds),
        "bytes_down_per_round": _mean(r.get("bytes_down", 0) for r in rounds),
        "bytes_per_site_round": record_bytes(initial),
        "full_model_bytes": counts["full_model_bytes"],
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "backbone": cfg.model.backbone, "weights_sha256": model.weights_sha256, "split_after": model.split_name,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "cache_hit": bool(val_hit and test_hit and sites_cache),
        "declined": {str(k): v for r in rounds for k, v in r.get("declined", {}).items()},
        "rejected_updates": sum(len(r.get("rejected", {})) for r in rounds),
        "backbone_transfer": transfer or None,  # weights sent to sites lacking them: bytes, sites, seconds
    }
    summary["bytes_per_site_round_fraction_of_model"] = summary["bytes_per_site_round"] / summary["full_model_bytes"]
    _write_json(out / "summary.json", summary)
    log.info("Run directory: %s | selected round %d: test AUC %.4f, acc %.4f", out, tracker.best_round,
             summary["test_auc"], summary["test_acc"])
    return summary


def ensure_backbone(grid: Grid, cfg: FedTLConfig, pinned_sha256: str, expected_sites: int,
                    timeout: float = 600.0, report: dict | None = None) -> dict[int, str]:
    """Make every connected site hold the pinned backbone: ask each, send the file to those lacking it.

    Returns ``{node_id: problem}`` for sites that still cannot use it (they will decline to train);
    ``report`` receives the transfer's ``bytes``, ``sites`` and ``seconds`` (until every reply) when one was sent.
    """
    from flwr.app import Array, Message, MessageType, RecordDict

    from fedtl.backbones import build_backbone

    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected_sites and time.monotonic() < deadline:
        time.sleep(1.0)
    nodes = list(grid.get_node_ids())
    ask = ConfigRecord({"action": "backbone-status", "backbone": cfg.model.backbone, "sha256": pinned_sha256})
    replies = grid.send_and_receive([Message(RecordDict({"config": ask}), dst_node_id=n, message_type=MessageType.QUERY)
                                     for n in nodes], timeout=timeout)
    lacking, problems = [], {}
    for r in replies:
        if r.has_error():
            problems[r.metadata.src_node_id] = r.error.reason
        elif not r.content["status"]["has"]:
            lacking.append(r.metadata.src_node_id)
    if lacking:
        path = build_backbone(cfg.model.backbone).weights_path
        payload = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        log.info("Sending %s weights (%d bytes) to %d site(s) lacking them.", cfg.model.backbone, payload.size, len(lacking))
        send = ConfigRecord({"action": "backbone-install", "backbone": cfg.model.backbone, "sha256": pinned_sha256})
        weights = ArrayRecord({"file": Array(payload)})
        t0 = time.perf_counter()
        replies = grid.send_and_receive(
            [Message(RecordDict({"config": send, "weights": weights}), dst_node_id=n, message_type=MessageType.QUERY)
             for n in lacking], timeout=timeout)
        seconds = time.perf_counter() - t0
        log.info("Backbone transfer: %d bytes to %d site(s), replies in %.2f s.", payload.size, len(lacking), seconds)
        if report is not None:
            report.update(bytes=int(payload.size), sites=len(lacking), seconds=round(seconds, 2))
        for r in replies:
            if r.has_error():
                problems[r.metadata.src_node_id] = r.error.reason
            elif not r.content["status"]["has"]:
                problems[r.metadata.src_node_id] = str(r.content["status"]["error"])
    for node, problem in problems.items():
        log.warning("Node %d cannot use the pinned backbone: %s", node, problem)
    return problems


def _mean(values) -> float:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else 0.0


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=_json_default))
    tmp.replace(path)
