"""Central evaluation and model selection: where a run evaluates, and what the server scores each round.

:func:`plan_evaluation` resolves ``evaluation.*`` against the data the server holds; :class:`Tracker` scores
the global suffix after every round (centrally and/or at the sites), appends ``metrics.jsonl`` and keeps the
best round's suffix and decision rule; :func:`site_table` is each site's figures for the selected suffix.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError
from fedtl.evaluation import POOLED_WEIGHT_CAP, Decision, central_decision, decision_of, sites_auc
from fedtl.federation.fedeval import SiteEvaluation
from fedtl.federation.records import to_record, to_state
from fedtl.federation.site import load_source
from fedtl.federation.strategy import SuffixFedAvg
from fedtl.model import TransferModel
from fedtl.training import evaluate_suffix

log = logging.getLogger(__name__)


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
    figure: ``central`` (validation AUC), ``federated`` (the AUC over all the sites' released validation images at
    once, :meth:`SiteEvaluation.pooled_val_auc`; the mean of their AUCs where none released any) or
    ``last`` (no validation data anywhere: the last round). Validation AUC is undefined (NaN) when
    the validation data hold a single class; the round is then selected by the lowest validation
    loss instead, logged once and recorded as ``selection_metric``. A round whose figure is undefined
    never beats a defined one, and the first trained round is kept until a better one comes.

    With ``decision = threshold``, each round's decision rule is chosen on the same validation data
    (central, or the sites' pooled releases), never on test data: for a binary task a threshold
    (federated: from the sites' score histograms), for a multi-class task per-class offsets to the
    log-probabilities (a ``bias`` rule; federated: from the sites' prediction rows). Accuracies are
    reported at it (``*_acc``) and at the argmax (``*_acc_argmax``).
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
    weight_cap: float = POOLED_WEIGHT_CAP  # a site's weight in the pooled federated figures and decision releases
    total_rounds: int = 0
    best_round: int = -1
    best_score: float = -math.inf  # val AUC, or minus val loss under the fallback; higher is better
    selection_metric: str | None = None  # "val_auc" | "val_loss" | "last", fixed by the first evaluation
    best_state: dict = field(default_factory=dict)
    best_decision: Decision = field(default_factory=Decision)
    best_eval: object = None  # the best round's SiteEvaluation (federated selection; its releases checkpointed)
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
            rows = self.history[self.best_round].get("sites_eval")
            if rows and self.select_by == "federated" and ckpt.best_eval is not None:  # else: as before, until a new best
                self.best_eval = SiteEvaluation.from_releases(rows, ckpt.best_eval)
        self.last_privacy = dict(ckpt.privacy)
        self.last_epsilon = {k: v["epsilon"] for k, v in self.last_privacy.items()}
        body = "".join(json.dumps(jsonable(row)) + "\n" for row in self.history)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(self.metrics_path)

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

    def _federated(self, server_round: int, arrays: ArrayRecord, row: dict, central_decision: bool) -> tuple:
        """Federated figures into ``row``; returns (val AUC that selects, val loss, the SiteEvaluation)."""
        ev = self.site_eval(server_round, arrays)
        decision = decision_of(row.get("decision")) if central_decision else \
            (ev.choose_decision(self.num_classes, self.weight_cap) if self.decision_mode == "threshold" else Decision())
        if not central_decision:
            row["decision"] = decision.to_dict()
        ev.apply(decision)
        pooled = ev.pooled(self.weight_cap, self.num_classes)
        row.update({f"fed_{k}": v for k, v in pooled.items()})
        row["sites_eval"] = dict(sorted(ev.sites.items()))
        if ev.skipped:
            row["eval_skipped"] = dict(sorted(ev.skipped.items()))
        if ev.timed_out:
            row["eval_timed_out"] = ev.timed_out
        return sites_auc(row, "val"), pooled["val_loss"], ev

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = to_state(arrays)
        self.model.load_trainable_state(state)
        row: dict = {"round": server_round}
        central = (math.nan, math.nan)
        if self.val is not None:
            central = self._central(row)
        federated = (math.nan, math.nan, None)
        if self.site_eval is not None and server_round > 0:
            federated = self._federated(server_round, arrays, row, central_decision=self.val is not None)
        row["seconds"] = round(time.perf_counter() - self.t0, 3)
        stats = self.strategy.rounds.get(server_round)
        if stats is not None:
            self.last_epsilon.update(stats.epsilon)
            self.last_privacy.update(stats.privacy)
            row.update({"bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "sites_trained": sorted(stats.trained),
                        "declined": stats.declined, "rejected": stats.rejected, "failed": stats.failed,
                        "timed_out": stats.timed_out, "not_connected": stats.not_connected,
                        "attempts": stats.attempts, "bounded": stats.bounded,
                        "capped": stats.capped,
                        "epsilon": dict(sorted(stats.epsilon.items())),
                        "privacy": dict(sorted(stats.privacy.items()))})
        self.history.append(row)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(jsonable(row)) + "\n")
        auc, loss, ev = (*central, None) if self.select_by == "central" else federated
        if server_round > 0:
            self._select(server_round, state, row, auc, loss, ev if self.select_by == "federated" else None)
        self._log(server_round, row, stats)
        pre = "" if self.val is not None else "fed_"
        figures = {k: row[pre + k] for k in ("val_auc", "val_acc", "test_auc", "test_acc") if pre + k in row}
        if pre:  # the AUCs over all the sites' images, as the headline and the selection
            figures.update({f"{s}_auc": sites_auc(row, s) for s in ("val", "test") if f"fed_{s}_auc" in row})
        return MetricRecord({k.replace("_", "-"): v for k, v in figures.items()})

    def _select(self, server_round: int, state: dict, row: dict, auc: float, loss: float, ev=None) -> None:
        """Keep this round if it beats the best so far. Under federated selection two rounds scored at different
        sites (one was down, or joined late) are compared on the sites both were scored at: the AUC over a different
        set of sites is a different figure (a round without the federation's hardest site would look better)."""
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
            score = self._score(auc, loss)
        mine, best = score, self.best_score
        if ev is not None and self.best_eval is not None and self.best_round >= 0:
            here, there = ev.val_sites(), self.best_eval.val_sites()
            common = here & there
            if common and here != there:
                mine = self._score(*ev.only(common).selecting_figures(self.num_classes, self.weight_cap))
                best = self._score(*self.best_eval.only(common).selecting_figures(self.num_classes, self.weight_cap))
                log.info("Round %d was scored at %d site(s), round %d (the best so far) at %d: compared on the %d both "
                         "were scored at, %.4f against %.4f.", server_round, len(here), self.best_round, len(there),
                         len(common), mine if self.selection_metric != "val_loss" else -mine,
                         best if self.selection_metric != "val_loss" else -best)
        if self.best_round < 0 or mine > best:
            self.best_round, self.best_score = server_round, score
            self.best_state = {k: x.clone() for k, x in state.items()}
            self.best_decision = decision_of(row.get("decision"))
            self.best_eval = ev

    def _score(self, auc: float, loss: float) -> float:
        """Higher is better: the validation AUC, or minus the validation loss under the fallback; -inf if undefined."""
        score = auc if self.selection_metric == "val_auc" else -loss
        return score if math.isfinite(score) else -math.inf

    def _log(self, server_round: int, row: dict, stats) -> None:
        """One line per round: figures, sites trained / declined / rejected / timed out, the largest ε."""
        parts = [f"Round {server_round}/{self.total_rounds}" if self.total_rounds else f"Round {server_round}"]
        for prefix, label in (("", "central"), ("fed_", "sites")):
            if f"{prefix}val_auc" in row:
                # the figures the round is selected and reported by (over all the sites' images)
                val, test = (sites_auc(row, "val"), sites_auc(row, "test")) if prefix else (row["val_auc"], row["test_auc"])
                unscored = sorted({*row.get("eval_skipped", {}), *row.get("eval_timed_out", ())}) if prefix else []
                parts.append(f"{label} val AUC {val:.4f} | test AUC {test:.4f} "
                             f"acc {row[prefix + 'test_acc']:.4f}"
                             + (f" (not scored at {', '.join(unscored[:5])}{' …' if len(unscored) > 5 else ''})"
                                if unscored else ""))
        if stats is not None:
            extra = "".join(f", {len(getattr(stats, k))} {k.replace('_', ' ')}"
                            for k in ("declined", "rejected", "timed_out", "not_connected", "bounded")
                            if getattr(stats, k))
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
    if not num_classes and demo_data:  # fedtl simulate without central evaluation: its sites' data set says
        num_classes = load_source(cfg.data.path).num_classes
    if source is not None and cfg.model.num_classes and cfg.model.num_classes != source.num_classes:
        raise ConfigError(f"`model.num-classes` is {cfg.model.num_classes} but the server's data "
                          f"{cfg.data.path} has {source.num_classes} classes.")
    if not num_classes:
        raise ConfigError("The server has no evaluation data to learn the number of classes from: set "
                          "`model.num-classes` (e.g. model.num-classes=2).")
    named = len(cfg.model.names)
    server_names = [c.strip() for c in ev.data_classes.split(",") if c.strip()]
    if named and server_names and [c.casefold() for c in server_names] != [c.casefold() for c in cfg.model.names]:
        raise ConfigError(f"`model.class-names` ({cfg.model.class_names}) and `evaluation.data-classes` "
                          f"({', '.join(server_names)}) name the classes differently; the sites are checked against "
                          "model.class-names.")
    if named and named != num_classes:
        raise ConfigError(f"`model.class-names` names {named} classes ({cfg.model.class_names}) but the task has "
                          f"{num_classes}.")
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
                           num_classes=max(num_classes, 2), path=data_cfg.path)


def site_table(tracker: Tracker, plan: EvaluationPlan, site_eval) -> dict | None:
    """Each site's figures for the selected suffix: from its round's federated evaluation, or one
    evaluation at the end (``evaluation.sites=final``)."""
    if plan.sites == "off":
        return None
    if plan.sites == "every-round":
        row = tracker.history[tracker.best_round]
        sites, skipped = row.get("sites_eval", {}), dict(row.get("eval_skipped", {}))
        pooled = {k[4:]: v for k, v in row.items() if k.startswith("fed_")}
        for name in row.get("eval_timed_out", ()):
            skipped.setdefault(name, f"did not answer round {tracker.best_round}'s evaluation in time")
        # a site that evaluated other rounds but was not connected at this one: named, not silently missing
        seen = {name for r in tracker.history for key in ("sites_eval", "eval_skipped", "eval_timed_out")
                for name in r.get(key, ())}
        for name in sorted(seen - set(sites) - set(skipped)):
            skipped[name] = f"not connected when round {tracker.best_round} was evaluated"
    else:
        ev = site_eval(tracker.best_round, to_record(tracker.best_state))
        ev.apply(tracker.best_decision)
        sites, skipped, pooled = ev.sites, ev.skipped, ev.pooled(tracker.weight_cap, tracker.num_classes)
        log.debug("Federated evaluation of the selected round at %d site(s): pooled test AUC %.4f acc %.4f",
                 len(sites), sites_auc(pooled, "test", ""), pooled["test_acc"])
    return {"sites": dict(sorted(sites.items())), "pooled": pooled, "skipped": dict(sorted(skipped.items()))}
