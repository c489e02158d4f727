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
from fedtl.federation.fedeval import evaluate_at_sites
from fedtl.federation.polling import send_and_receive
from fedtl.federation.records import record_bytes, to_record, to_state
from fedtl.federation.site import build_transfer_model, cached_features, load_source
from fedtl.federation.strategy import RoundStats, SuffixFedAvg, make_strategy
from fedtl.model import TransferModel
from fedtl.evaluation import Decision, central_decision, decision_of
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


def jsonable(value):
    """``value`` with every non-finite float as ``None``: run files are strict JSON (``NaN`` is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclass
class Tracker:
    """Evaluates the global suffix each round and keeps the best round by validation figures.

    Central evaluation uses the server's own validation/test data (when it has any); federated
    evaluation (``site_eval``) asks the sites to score the suffix on theirs. ``select_by`` picks the
    figure: ``central`` (validation AUC), ``federated`` (pooled validation AUC of the sites) or
    ``last`` (no validation data anywhere: the last round). Validation AUC is undefined (NaN) when
    the validation data hold a single class; the round is then selected by the lowest validation
    loss instead, logged once and recorded as ``selection_metric``. A round whose figure is undefined
    never beats a defined one, and the first trained round is kept until a better one comes.

    For a binary task with ``decision = threshold``, each round's decision threshold is chosen on
    the same validation data (central, or the sites' pooled score histograms), never on test data;
    accuracies are reported at it (``*_acc``) and at the argmax (``*_acc_argmax``). A multi-class task
    gets per-class offsets to the log-probabilities chosen on the server's own validation data (a
    ``bias`` rule; federated validation has no statistic for them yet, so it keeps the argmax).
    """

    model: TransferModel
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor] | None
    strategy: SuffixFedAvg
    metrics_path: Path
    site_eval: object = None  # callable (round, arrays) -> SiteEvaluation, every round
    select_by: str = "central"  # central | federated | last
    decision_mode: str = "threshold"
    num_classes: int = 2
    weight_cap: float = 4.0
    total_rounds: int = 0
    best_round: int = -1
    best_score: float = -math.inf  # val AUC, or minus val loss under the fallback; higher is better
    selection_metric: str | None = None  # "val_auc" | "val_loss" | "last", fixed by the first evaluation
    best_state: dict = field(default_factory=dict)
    best_decision: Decision = field(default_factory=Decision)
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
        if 0 <= self.best_round < len(self.history):
            self.best_decision = decision_of(self.history[self.best_round].get("decision"))
        self.last_privacy = dict(ckpt.privacy)
        self.last_epsilon = {k: v["epsilon"] for k, v in self.last_privacy.items()}
        body = "".join(json.dumps(jsonable(row)) + "\n" for row in self.history)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(self.metrics_path)

    @property
    def binary_threshold(self) -> bool:
        return self.num_classes == 2 and self.decision_mode == "threshold"

    def _central(self, row: dict) -> tuple[float, float]:
        """Central figures into ``row``; returns (val AUC, val loss) and sets the round's decision."""
        v = evaluate_suffix(self.model, *self.val)
        t = evaluate_suffix(self.model, *self.test)
        decision = central_decision(v.probabilities, self.val[1].numpy(), self.decision_mode)
        row["decision"] = decision.to_dict()
        for name, r, (_, y) in (("val", v, self.val), ("test", t, self.test)):
            acc = float(np.mean(decision.apply(r.probabilities) == y.numpy())) if r.num_examples else float("nan")
            row.update({f"{name}_auc": r.auc, f"{name}_acc": acc, f"{name}_acc_argmax": r.accuracy,
                        f"{name}_loss": r.loss})
        return v.auc, v.loss

    def _federated(self, server_round: int, arrays: ArrayRecord, row: dict, central_decision: bool) -> tuple[float, float]:
        ev = self.site_eval(server_round, arrays)
        decision = decision_of(row.get("decision")) if central_decision else \
            (ev.choose_threshold(self.num_classes == 2) if self.binary_threshold else Decision())
        if not central_decision:
            row["decision"] = decision.to_dict()
        ev.apply(decision)
        pooled = ev.pooled(self.weight_cap)
        row.update({f"fed_{k}": v for k, v in pooled.items()})
        row["sites_eval"] = dict(sorted(ev.sites.items()))
        if ev.skipped:
            row["eval_skipped"] = dict(sorted(ev.skipped.items()))
        if ev.timed_out:
            row["eval_timed_out"] = ev.timed_out
        return pooled["val_auc"], pooled["val_loss"]

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = to_state(arrays)
        self.model.load_trainable_state(state)
        row: dict = {"round": server_round}
        central = (math.nan, math.nan)
        if self.val is not None:
            central = self._central(row)
        federated = (math.nan, math.nan)
        if self.site_eval is not None and server_round > 0:
            federated = self._federated(server_round, arrays, row, central_decision=self.val is not None)
        row["seconds"] = round(time.perf_counter() - self.t0, 3)
        stats = self.strategy.rounds.get(server_round)
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
            fh.write(json.dumps(jsonable(row)) + "\n")
        auc, loss = central if self.select_by == "central" else federated
        if server_round > 0:
            self._select(server_round, state, row, auc, loss)
        self._log(server_round, row, stats)
        pre = "" if self.val is not None else "fed_"
        return MetricRecord({k.replace("_", "-"): row[pre + k] for k in ("val_auc", "val_acc", "test_auc", "test_acc")
                             if pre + k in row})

    def _select(self, server_round: int, state: dict, row: dict, auc: float, loss: float) -> None:
        if self.select_by == "last":
            self.selection_metric = "last"
            score = float(server_round)
        else:
            if self.selection_metric is None:
                self.selection_metric = "val_auc" if math.isfinite(auc) else "val_loss"
                if self.selection_metric == "val_loss":
                    what = "the sites' validation data hold a single class"
                    if self.select_by == "central":
                        classes = sorted({int(c) for c in self.val[1].tolist()})
                        what = f"the validation split holds {len(self.val[1])} example(s) of class(es) {classes} only"
                    log.warning("Validation AUC is undefined (%s); selecting the round by the lowest validation loss "
                                "instead.", what)
            score = auc if self.selection_metric == "val_auc" else -loss
            score = score if math.isfinite(score) else -math.inf
        if self.best_round < 0 or score > self.best_score:
            self.best_round, self.best_score = server_round, score
            self.best_state = {k: x.clone() for k, x in state.items()}
            self.best_decision = decision_of(row.get("decision"))

    def _log(self, server_round: int, row: dict, stats) -> None:
        """One line per round: figures, sites trained / declined / rejected / timed out, the largest ε."""
        parts = [f"Round {server_round}/{self.total_rounds}" if self.total_rounds else f"Round {server_round}"]
        for prefix, label in (("", "central"), ("fed_", "sites")):
            if f"{prefix}val_auc" in row:
                parts.append(f"{label} val AUC {row[prefix + 'val_auc']:.4f} | test AUC {row[prefix + 'test_auc']:.4f} "
                             f"acc {row[prefix + 'test_acc']:.4f}")
        if stats is not None:
            extra = "".join(f", {len(getattr(stats, k))} {k.replace('_', ' ')}"
                            for k in ("declined", "rejected", "timed_out", "bounded") if getattr(stats, k))
            eps = max(stats.epsilon.values(), default=0.0)
            parts.append(f"{len(stats.trained)} trained{extra} | max ε {eps:.2f}")
        (log.debug if server_round == 0 and self.total_rounds > 20 else log.info)(" | ".join(parts))


@dataclass(frozen=True)
class EvaluationPlan:
    """Where this run evaluates, resolved from ``evaluation.*`` and what data the server holds."""

    source: object  # the server's MedMNISTSource, or None (no central evaluation)
    data: str  # what the server evaluates on, in words (summary.json / report)
    sites: str  # every-round | final | off
    select_by: str  # central | federated | last
    num_classes: int


def plan_evaluation(cfg: FedTLConfig, demo_data: bool) -> EvaluationPlan:
    """Resolve ``evaluation.*``. The bundled demo data is used only where ``demo_data`` (``fedtl simulate``):
    a deployed server without ``data.path`` never falls back to it; it evaluates at the sites."""
    ev = cfg.evaluation
    has_data = bool(cfg.data.path) or bool(ev.data_path) or demo_data
    central = ev.central == "on" or (ev.central == "auto" and has_data)
    if central and not has_data:
        raise ConfigError("`evaluation.central=on` needs the server's evaluation data: set `data.path` to a "
                          "MedMNIST-format .npz (its val and test splits are used), or `evaluation.data-format` "
                          "and `evaluation.data-path` (image files with a labels CSV).")
    source = None
    if central:
        source = server_image_source(cfg) if ev.data_path else load_source(cfg.data.path)
    if source is not None:
        what = (f"{ev.data_path} ({ev.data_format})" if ev.data_path else
                str(cfg.data.path) if cfg.data.path else "the bundled PneumoniaMNIST (demo data)")
    else:
        what = "none (federated evaluation at the sites)"
        if not cfg.data.path and ev.central == "auto":
            log.warning("The server has no evaluation data (data.path is empty): the global model is evaluated at "
                        "the sites (federated evaluation). The bundled demo data is used by `fedtl simulate` only.")
    num_classes = source.num_classes if source is not None else cfg.model.num_classes
    if source is not None and cfg.model.num_classes and cfg.model.num_classes != source.num_classes:
        raise ConfigError(f"`model.num-classes` is {cfg.model.num_classes} but the server's data "
                          f"{cfg.data.path} has {source.num_classes} classes.")
    if not num_classes:
        raise ConfigError("The server has no evaluation data to learn the number of classes from: set "
                          "`model.num-classes` (e.g. model.num-classes=2).")
    sites = ev.sites if ev.sites != "auto" else ("final" if source is not None else "every-round")
    select_by = ev.select_by if ev.select_by != "auto" else ("central" if source is not None else "federated")
    if select_by == "central" and source is None:
        raise ConfigError("`evaluation.select-by=central` needs the server's evaluation data (`data.path`).")
    if select_by == "federated" and sites != "every-round":
        if ev.sites not in ("auto", "every-round") and ev.select_by == "federated":
            raise ConfigError("`evaluation.select-by=federated` needs `evaluation.sites=every-round`.")
        sites = "every-round"
    if source is None and sites == "off":
        select_by = "last"
        log.warning("Nothing evaluates this run (no server data, evaluation.sites=off): the last round's suffix is kept.")
    return EvaluationPlan(source, what, sites, select_by, num_classes)


def server_image_source(cfg: FedTLConfig):
    """The server's evaluation images from files (folder / DICOM with a labels CSV, or an npz split),
    read and checked like a site's, split into validation and test (stratified, by ``data.seed``)."""
    from types import SimpleNamespace

    from fedtl.data.site_sources import load_site_data
    from fedtl.evaluation import stratified_split
    from fedtl.site_config import SiteDataConfig

    ev = cfg.evaluation
    classes = tuple(c.strip() for c in ev.data_classes.split(",") if c.strip())
    try:
        data_cfg = SiteDataConfig(format=ev.data_format, path=Path(ev.data_path).expanduser(),
                                  labels=Path(ev.data_labels).expanduser() if ev.data_labels else None,
                                  classes=classes, split="test" if ev.data_format == "medmnist" else "train")
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("`data.", "`evaluation.data-")) from None
    images = load_site_data(data_cfg).images
    num_classes = len(classes) or int(images.labels.max()) + 1
    val, test = stratified_split(images.labels, ev.validation_fraction, cfg.data.seed)
    return SimpleNamespace(val=images.subset(val, "server-val"), test=images.subset(test, "server-test"),
                           num_classes=max(num_classes, 2))


def run_server(grid: Grid, cfg: FedTLConfig, run_id: str, distribute_backbone: bool = True,
               demo_data: bool = False) -> dict:
    """Run the federation for ``cfg.federation.rounds`` rounds and write the run directory.

    Every completed round is checkpointed (``checkpoint.safetensors``); with ``output.resume`` the
    run continues from the last checkpoint of ``output.dir`` and ends with the same files.
    ``demo_data``: an empty ``data.path`` means the bundled PneumoniaMNIST (``fedtl simulate`` only).
    """
    t_start = time.perf_counter()
    plan = plan_evaluation(cfg, demo_data)  # validates the data before anything is written
    source = plan.source
    model = build_transfer_model(cfg, plan.num_classes)
    val = test = None
    val_hit = test_hit = True
    if source is not None:
        val_f, val_hit = cached_features(cfg, model, source.val)
        test_f, test_hit = cached_features(cfg, model, source.test)
        val, test = (val_f, torch.as_tensor(source.val.labels)), (test_f, torch.as_tensor(source.test.labels))
    out = Path(cfg.output.dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
    fed = cfg.federation
    strategy = make_strategy(
        fed.aggregation, model.expected_state(), max_hostile=fed.max_hostile, sites=fed.sites,
        update_clip=fed.update_clip, weight_cap=fed.weight_cap, fraction_train=fed.fraction_train,
        min_train_nodes=fed.min_sites, min_available_nodes=fed.min_sites,  # the round loop waits (bounded)
    )
    eval_config = ConfigRecord({"num-classes": plan.num_classes, "backbone": cfg.model.backbone,
                                "backbone-sha256": model.weights_sha256})

    def site_eval(rnd: int, arrays: ArrayRecord):
        return evaluate_at_sites(grid, strategy, rnd, arrays, eval_config, fed.round_timeout, plan.num_classes)

    tracker = Tracker(model, val, test, strategy, out / "metrics.jsonl",
                      site_eval=site_eval if plan.sites == "every-round" else None, select_by=plan.select_by,
                      decision_mode=cfg.evaluation.decision, num_classes=plan.num_classes,
                      weight_cap=fed.weight_cap or 0.0, total_rounds=fed.rounds)
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
    log.info("Evaluation: server data: %s; sites: %s; rounds selected by %s validation.", plan.data, plan.sites,
             plan.select_by)
    transfer: dict = {}
    if distribute_backbone:
        ensure_backbone(grid, cfg, model.weights_sha256, fed.sites, timeout=fed.round_timeout, report=transfer)
    train_config = ConfigRecord({"total-rounds": fed.rounds, "run-id": fedtl_run, "num-classes": plan.num_classes,
                                 "backbone": cfg.model.backbone, "backbone-sha256": model.weights_sha256,
                                 "noise-multiplier": cfg.privacy.noise_multiplier,
                                 "personalize-epochs": cfg.personalization.requested_epochs})
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
    site_table = _site_table(tracker, plan, site_eval)
    personal = None
    if cfg.personalization.kind != "none":  # after the last round: the sites fine-tune the selected suffix
        from fedtl.federation.personalize import personalize_at_sites

        personal = personalize_at_sites(grid, strategy, to_record(tracker.best_state), ConfigRecord({
            "run-id": fedtl_run, "epochs": cfg.personalization.epochs, "num-classes": plan.num_classes,
            "backbone-sha256": model.weights_sha256}), fed.round_timeout).table()
    return _finish(cfg, out, model, tracker, to_record(model.trainable_state()), t_start, val_hit and test_hit,
                   transfer, plan, site_table, personal)


def _site_table(tracker: Tracker, plan: EvaluationPlan, site_eval) -> dict | None:
    """Each site's figures for the selected suffix: from its round's federated evaluation, or one
    evaluation at the end (``evaluation.sites=final``)."""
    if plan.sites == "off":
        return None
    if plan.sites == "every-round":
        row = tracker.history[tracker.best_round]
        sites, skipped = row.get("sites_eval", {}), row.get("eval_skipped", {})
        pooled = {k[4:]: v for k, v in row.items() if k.startswith("fed_")}
    else:
        ev = site_eval(tracker.best_round, to_record(tracker.best_state))
        ev.apply(tracker.best_decision)
        sites, skipped, pooled = ev.sites, ev.skipped, ev.pooled(tracker.weight_cap)
        log.debug("Federated evaluation of the selected round at %d site(s): pooled test AUC %.4f acc %.4f",
                 len(sites), pooled["test_auc"], pooled["test_acc"])
    return {"sites": dict(sorted(sites.items())), "pooled": pooled, "skipped": dict(sorted(skipped.items()))}


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
            t_start: float, server_cache_hit: bool, transfer: dict | None, plan: EvaluationPlan,
            site_table: dict | None, personalization: dict | None = None) -> dict:
    fed = cfg.federation
    best = tracker.history[tracker.best_round]
    final = tracker.history[-1]
    rounds = [r for r in tracker.history if r["round"] > 0]
    counts = model.param_counts()
    decision = tracker.best_decision
    save_file({k: v.contiguous() for k, v in tracker.best_state.items()}, out / "suffix.safetensors",
              metadata={"backbone": cfg.model.backbone, "weights_sha256": model.weights_sha256,
                        "round": str(tracker.best_round), "split": model.split_name,
                        "num_classes": str(plan.num_classes), **decision.to_metadata()})
    dp = cfg.privacy.enabled or bool(tracker.last_privacy)  # deployed sites always report their DP spend
    # headline figures: the server's test data when it has any, else the sites' pooled test figures
    pre = "" if plan.source is not None else "fed_"
    pooled_test = (site_table or {}).get("pooled", {})
    headline = {k: best.get(pre + k, pooled_test.get(k, float("nan")) if pre else float("nan"))
                for k in ("test_auc", "test_acc", "test_acc_argmax", "val_auc", "val_acc", "val_loss")}
    summary = {
        **headline,
        "selected_round": tracker.best_round, "selection_metric": tracker.selection_metric,
        "evaluation": {"server_data": plan.data, "sites": plan.sites, "selected_by": plan.select_by,
                       "headline": "central test split" if plan.source is not None else "sites' pooled test splits"},
        "decision": decision.to_dict(),
        "per_site": site_table,
        "personalization": personalization,  # each site's figures under the global vs its personal suffix
        "final_round_test_auc": final.get(pre + "test_auc", float("nan")),
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
