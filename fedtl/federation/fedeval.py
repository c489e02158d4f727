"""Federated evaluation: the server sends a suffix, each site scores it on its own labelled data.

Protocol (both directions are untrusted input for the receiver):

- request (``MessageType.EVALUATE``): ``arrays`` (the suffix) and ``config`` with ``server-round``,
  ``run-id``, ``num-classes``, ``backbone``, ``backbone-sha256``;
- reply: exactly :data:`EVAL_METRIC_KEYS` — for the site's validation and test splits the number of
  examples, AUC (−1: undefined), argmax accuracy, loss, for binary tasks per-class histograms
  of the positive-class score over :data:`fedtl.evaluation.HIST_BINS` bins (all zeros otherwise), for
  multi-class tasks the prediction rows (:func:`fedtl.evaluation.prediction_rows`; empty otherwise) —
  and ``info`` (``site``, ``reason``). A site that does not evaluate replies ``evaluated = 0``.

These are released statistics of the site's evaluation images (no DP; ``docs/privacy.md``). The
histograms (binary) and prediction rows (multi-class) let the server choose the decision rule — a
threshold, per-class offsets — and compute each site's accuracy at it without a second message and
without touching training data: exactly at a threshold (a bin edge), to within the rows' rounding at
offsets (classes the rounding ties count as a fair share: the figure need not be a whole count).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtl.evaluation import (FIGURE_DECIMALS, HIST_BINS, POOLED_WEIGHT_CAP, PRED_FLOOR, Decision, bias_from_log_probabilities,
                               max_prediction_images, pooled, rows_accuracy, rows_log_probabilities, sites_auc,
                               threshold_from_histograms)
from fedtl.weighting import aggregation_weights

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
_FIGS = ("n", "auc", "acc", "loss")
EVAL_METRIC_KEYS = ("evaluated", *(f"{s}-{k}" for s in SPLITS for k in (*_FIGS, "hist-neg", "hist-pos", "preds")))
EVAL_INFO_KEYS = ("site", "reason")
MAX_EVAL_EXAMPLES = 10_000_000
MAX_LOSS = 1e4
TRIM_SITES_FROM = 5  # multi-class offsets: with this many sites' rows, the best and worst site at each candidate are left out


@dataclass(frozen=True)
class EvalRequest:
    """A server's evaluate message, validated at the site like a file from a stranger."""

    server_round: int
    num_classes: int  # 0: not given (simulation: the data set's)
    backbone_sha256: str
    pooling: str = ""  # the server's model.pooling ('' = not given)
    head: str = ""  # the server's model.head ('' = not given)

    @classmethod
    def parse(cls, config) -> EvalRequest:
        from fedtl.federation.records import (MAX_ROUNDS, config_head, config_int, config_num_classes, config_pooling,
                                              config_sha256)

        rnd = config_int(config, "server-round", 0, MAX_ROUNDS, 0)
        return cls(rnd, config_num_classes(config), config_sha256(config), config_pooling(config), config_head(config))


def eval_reply(split_figures: dict[str, dict] | None, *, site: str, reason: str = "") -> RecordDict:
    """A site's evaluation reply. ``split_figures[split]`` holds n, auc, acc, loss, and hist_neg, hist_pos (binary)
    or preds (multi-class: :func:`fedtl.evaluation.prediction_rows`)."""
    values: dict = {"evaluated": 1 if split_figures else 0}
    for s in SPLITS:
        f = (split_figures or {}).get(s) or {}
        n = int(f.get("n", 0))
        values[f"{s}-n"] = n
        for k in ("auc", "acc", "loss"):
            v = float(f.get(k, float("nan")))
            values[f"{s}-{k}"] = round(v, FIGURE_DECIMALS) if math.isfinite(v) and n else -1.0
        for k in ("hist-neg", "hist-pos"):
            h = list(f.get(k.replace("-", "_"), ()) or ())
            values[f"{s}-{k}"] = [int(x) for x in h] if len(h) == HIST_BINS else [0] * HIST_BINS
        values[f"{s}-preds"] = [int(x) for x in f.get("preds", ())] if n else []
    return RecordDict({"metrics": MetricRecord(values), "info": ConfigRecord({"site": site[:64], "reason": reason[:1000]})})


@dataclass(frozen=True)
class CheckedReply:
    """A site's figures-only reply (evaluate, personalize) whose layout matches its protocol; its values are read
    through :meth:`number`, :meth:`optional` and :meth:`figures`, each range-checked as it is read."""

    metrics: Mapping[str, Any]
    site: str  # as the site claims it (at most 64 characters)
    reason: str  # at most 1000 characters

    @classmethod
    def check(cls, content: RecordDict, metric_keys: Iterable[str], info_keys: Iterable[str], *,
              info_only: bool = False) -> CheckedReply:
        """Raises ValueError naming the problem: not exactly one MetricRecord; metric keys other than exactly
        ``metric_keys`` (naming the unexpected and the missing ones); with ``info_only``, a config record besides
        ``info``; an info entry outside ``info_keys`` or not a string."""
        if len(content.metric_records) != 1:
            raise ValueError(f"expected one MetricRecord, got {len(content.metric_records)}")
        raw = next(iter(content.metric_records.values()))
        keys, expected = set(raw.keys()), set(metric_keys)
        if keys != expected:
            extra, missing = sorted(keys - expected), sorted(expected - keys)
            raise ValueError(f"metric keys differ from the protocol's (unexpected: {extra[:5]}, missing: {missing[:5]})")
        if info_only and set(content.config_records.keys()) - {"info"}:
            raise ValueError("unexpected config records in the reply")
        info = content["info"] if "info" in content.config_records else {}
        allowed = set(info_keys)
        for key, value in info.items():
            if key not in allowed or not isinstance(value, str):
                raise ValueError(f"info `{key}` is not part of the protocol or not a string")
        return cls(raw, str(info.get("site", ""))[:64], str(info.get("reason", ""))[:1000])

    def number(self, key: str, low: float, high: float, integer: bool = False) -> float:
        """Metric ``key``: a finite number (``integer``: a whole one), not a bool, in [low, high]."""
        v = self.metrics[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
                or not low <= float(v) <= high or (integer and int(v) != v):
            raise ValueError(f"`{key}` must be {'an integer' if integer else 'a number'} in [{low:g}, {high:g}], got {v!r:.60}")
        return float(v)

    def optional(self, key: str, high: float, unset: str = "undefined") -> float:
        """Metric ``key``: a number in [0, high], or −1 (``unset``) read as NaN."""
        v = self.number(key, -1.0, high)
        if v < 0 and v != -1.0:
            raise ValueError(f"`{key}` must be >= 0 or -1 ({unset}), got {v!r}")
        return float("nan") if v == -1.0 else v

    def figures(self, prefix: str, max_examples: int, max_loss: float) -> dict:
        """``{prefix}-n``, ``-auc``, ``-acc``, ``-loss`` as {"n": int, "auc", "acc", "loss": float, NaN: undefined}."""
        fig: dict = {"n": int(self.number(f"{prefix}-n", 0, max_examples, integer=True))}
        for k, high in (("auc", 1.0), ("acc", 1.0), ("loss", max_loss)):
            fig[k] = self.optional(f"{prefix}-{k}", high)
        return fig


def parse_eval_reply(content: RecordDict, num_classes: int) -> tuple[str, dict | None, str]:
    """(site name claimed, {split: figures} or None if it did not evaluate, reason). Raises ValueError
    naming every problem of a malformed reply."""
    reply = CheckedReply.check(content, EVAL_METRIC_KEYS, EVAL_INFO_KEYS)
    site, reason = reply.site, reply.reason
    if reply.number("evaluated", 0, 1, integer=True) == 0:
        return site, None, reason
    out: dict[str, dict] = {}
    for s in SPLITS:
        fig = reply.figures(s, MAX_EVAL_EXAMPLES, MAX_LOSS)
        n = fig["n"]
        if n and (math.isnan(fig["acc"]) or math.isnan(fig["loss"])):
            raise ValueError(f"`{s}`: accuracy and loss are required when n > 0")
        hists = []
        for k in ("hist-neg", "hist-pos"):
            h = reply.metrics[f"{s}-{k}"]
            if not isinstance(h, list) or len(h) != HIST_BINS or any(
                    isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_EVAL_EXAMPLES for x in h):
                raise ValueError(f"`{s}-{k}` must be {HIST_BINS} non-negative integer counts")
            hists.append(np.asarray(h, dtype=np.int64))
        total = int(hists[0].sum() + hists[1].sum())
        if num_classes == 2 and n and total not in (0, n):  # 0: not released (the site's evaluation.release-scores)
            raise ValueError(f"`{s}` histograms count {total} examples, not n = {n}")
        if num_classes == 2 and n and total:
            fig["hist_neg"], fig["hist_pos"] = hists
        rows = check_prediction_rows(reply.metrics[f"{s}-preds"], num_classes, n, f"{s}-preds")
        if rows is not None:
            fig["preds"] = rows
        out[s] = fig
    return site, out, reason


def check_prediction_rows(value, num_classes: int, n: int, key: str) -> np.ndarray | None:
    """A reply's prediction rows for one split as an (R, K + 2) array, or None where it sends none (a binary task or
    an empty split, where the list must be empty; an empty list: the site does not release them). Raises ValueError
    naming what is wrong: not a list of integers, not whole rows of ``label, q_0 … q_{K-1}, count``, a label outside
    the classes, a q above 0 or below the floor, a row whose most likely class is not at 0, a count below 1, or
    counts that do not add up to the split's n (at most :func:`fedtl.evaluation.max_prediction_images`)."""
    if not isinstance(value, list):
        raise ValueError(f"`{key}` must be a list of integers")
    if num_classes <= 2 or not n:
        if value:
            raise ValueError(f"`{key}` must be empty {'for a binary task' if num_classes <= 2 else 'when n = 0'}")
        return None
    if not value:  # the site's evaluation.release-scores = false
        return None
    width, expected = num_classes + 2, min(n, max_prediction_images(num_classes))
    if len(value) % width or len(value) > width * expected:
        raise ValueError(f"`{key}` must be whole rows of {width} integers (label, {num_classes} values, count), "
                         f"at most {expected} rows; got {len(value)} integers")
    if any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        raise ValueError(f"`{key}` must be a list of integers")
    rows = np.asarray(value, dtype=np.int64).reshape(-1, width)
    q = rows[:, 1:-1]
    if not ((rows[:, 0] >= 0) & (rows[:, 0] < num_classes)).all():
        raise ValueError(f"`{key}` holds a label outside 0 … {num_classes - 1}")
    if not ((q >= -PRED_FLOOR) & (q <= 0)).all() or not (q.max(axis=1) == 0).all():
        raise ValueError(f"`{key}` values must be in [-{PRED_FLOOR}, 0] with 0 at each row's most likely class")
    if (rows[:, -1] < 1).any() or int(rows[:, -1].sum()) != expected:
        raise ValueError(f"`{key}` counts must be >= 1 and add up to {expected} images, got {int(rows[:, -1].sum())}")
    return rows


RELEASE_KEYS = ("hist_neg", "hist_pos", "preds")  # a split's released scores, besides its figures


def site_scales(counts: list[float], weight_cap: float) -> list[float]:
    """Per site, what each of its released validation images counts in the pooled histograms, rows and AUC: its
    capped weight (at most ``weight_cap`` × the median site's, as in the pooled figures) over its image count."""
    return [w / c if c > 0 else 0.0 for w, c in zip(aggregation_weights(counts, "examples", weight_cap), counts)]


def histogram_auc(neg: np.ndarray, pos: np.ndarray, tied_above: float = 0.5) -> float:
    """The AUC of score histograms (bins in score order; counts may be weighted): the share of (positive, negative)
    pairs in which the positive is in a higher bin, plus ``tied_above`` of the pairs in the same bin; NaN when a
    class is empty."""
    neg, pos = np.asarray(neg, dtype=float), np.asarray(pos, dtype=float)
    total = neg.sum() * pos.sum()
    if total <= 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins than each bin
    return float(((pos * below).sum() + tied_above * (pos * neg).sum()) / total)


def tied_pairs_above(sites: list[tuple[np.ndarray, np.ndarray, float | None]]) -> float:
    """Of the (positive, negative) pairs a site's histograms put in the same bin, the share in which the positive
    scored higher, from the sites' own exact AUCs: each site's AUC less its histograms' AUC with ties at zero is
    that share of its tied pairs. Pooled over the sites with tied pairs and an AUC, clipped to [0, 1]; 0.5 where
    none has both."""
    tied = above = 0.0
    for neg, pos, auc in sites:
        if auc is None or not math.isfinite(float(auc)):
            continue
        neg, pos = np.asarray(neg, dtype=float), np.asarray(pos, dtype=float)
        ties, pairs = float((neg * pos).sum()), float(neg.sum() * pos.sum())
        if ties <= 0 or pairs <= 0:
            continue
        tied += ties
        above += float(auc) * pairs - histogram_auc(neg, pos, 0.0) * pairs
    return min(1.0, max(0.0, above / tied)) if tied > 0 else 0.5


def accuracy_at(fig: dict, threshold: float) -> float:
    """Accuracy at a bin-edge threshold from a split's histograms (exact)."""
    k = int(round(threshold * HIST_BINS))
    neg, pos = fig["hist_neg"], fig["hist_pos"]
    return float((neg[:k].sum() + pos[k:].sum()) / max(1, neg.sum() + pos.sum()))


@dataclass
class SiteEvaluation:
    """One federated evaluation: each site's figures, the pooled ones, and who did not answer."""

    sites: dict[str, dict] = field(default_factory=dict)  # site -> {"val_auc": …, "test_acc": …, "val_n": …}
    skipped: dict[str, str] = field(default_factory=dict)  # site -> why it has no figures
    timed_out: list[str] = field(default_factory=list)
    raw: dict[str, dict] = field(default_factory=dict)  # site -> parsed figures incl. histograms
    decision: Decision = field(default_factory=Decision)

    def add(self, site: str, figs: dict | None, reason: str) -> None:
        """A parsed reply (:func:`parse_eval_reply`): its figures, or why the site has none."""
        if figs is None:
            self.skipped[site] = reason or "does not evaluate"
            return
        self.raw[site] = figs
        self.sites[site] = {f"{s}_{k}": figs[s][k] for s in SPLITS for k in _FIGS}

    def pooled(self, weight_cap: float, num_classes: int | None = None) -> dict:
        """The sites' pooled figures: example-weighted means (:func:`fedtl.evaluation.pooled`) and, given
        ``num_classes``, each split's AUC over all the released images (``val_auc_pooled``, ``test_auc_pooled``:
        :meth:`pooled_auc`)."""
        rows = list(self.sites.values())
        out = {**pooled(rows, "val", weight_cap), **pooled(rows, "test", weight_cap)}
        if num_classes is not None:
            for split in SPLITS:
                out[f"{split}_auc_pooled"] = round(self.pooled_auc(split, num_classes, weight_cap), FIGURE_DECIMALS)
        return out

    def val_sites(self) -> frozenset[str]:
        """The sites that scored this suffix on validation images (the sites a round's selecting figure covers)."""
        return frozenset(s for s, row in self.sites.items() if row.get("val_n", 0) > 0)

    def only(self, sites: frozenset[str] | set[str]) -> SiteEvaluation:
        """This evaluation restricted to ``sites`` (to compare two rounds on the sites both were scored at)."""
        return SiteEvaluation(sites={s: r for s, r in self.sites.items() if s in sites},
                              raw={s: r for s, r in self.raw.items() if s in sites})

    def val_releases(self) -> dict[str, dict[str, np.ndarray]]:
        """Each site's released validation scores (histograms or prediction rows): what :meth:`selecting_figures`
        reads besides the sites' rows, kept in the run's checkpoint for the best round."""
        return {s: {k: np.asarray(v) for k, v in f.get("val", {}).items() if k in RELEASE_KEYS}
                for s, f in self.raw.items()}

    @classmethod
    def from_releases(cls, rows: dict[str, dict], releases: dict[str, dict[str, np.ndarray]]) -> SiteEvaluation:
        """A round's validation evaluation rebuilt from its metrics row's ``sites_eval`` and :meth:`val_releases`
        (a resumed run's best round, to compare later rounds with on the sites both were scored at)."""
        return cls(sites={s: dict(r) for s, r in rows.items()},
                   raw={s: {"val": dict(releases.get(s, {}))} for s in rows})

    def selecting_figures(self, num_classes: int, weight_cap: float = POOLED_WEIGHT_CAP) -> tuple[float, float]:
        """(validation AUC, validation loss) a round is selected by: the AUC over all the released validation images
        (:meth:`pooled_val_auc`), or the sites' example-weighted mean AUC where none released any; the mean loss."""
        figs = self.pooled(weight_cap, num_classes)
        return sites_auc(figs, "val", ""), figs["val_loss"]

    def pooled_val_auc(self, num_classes: int, weight_cap: float = POOLED_WEIGHT_CAP) -> float:
        """The validation AUC over all the releasing sites' validation images at once (:meth:`pooled_auc`). One AUC
        over a federation's ~100 validation images moves far less from round to round than the mean of ten AUCs
        over ~12 images each (RetinaMNIST without server data: that mean peaked at round 3 of a run still learning
        at round 40)."""
        return self.pooled_auc("val", num_classes, weight_cap)

    def pooled_auc(self, split: str, num_classes: int, weight_cap: float = POOLED_WEIGHT_CAP) -> float:
        """The AUC of ``split`` over all the releasing sites' images at once (macro one-vs-rest for multi-class), each
        site's images weighted as in :meth:`choose_decision`; NaN when no site released any or one class is all
        there is. Multi-class: from the prediction rows (log-probabilities rounded to 0.1). Binary: from the score
        histograms, a positive and a negative in the same bin counted as the sites' own exact AUCs say such pairs
        fall (:func:`tied_pairs_above`; half, where no site's AUC says) — counted a half each, the 50 bins'
        ties read 0.005 low on PneumoniaMNIST's test split (0.9639 against 0.9691)."""
        key = "hist_neg" if num_classes == 2 else "preds"
        named = [(site, f[split]) for site, f in self.raw.items() if key in f.get(split, {})]
        if not named:
            return float("nan")
        figs = [f for _, f in named]
        counts = [float(f["hist_neg"].sum() + f["hist_pos"].sum()) if num_classes == 2 else float(f["preds"][:, -1].sum())
                  for f in figs]
        scale = site_scales(counts, weight_cap)
        if num_classes == 2:
            neg = sum(f["hist_neg"] * k for f, k in zip(figs, scale))
            pos = sum(f["hist_pos"] * k for f, k in zip(figs, scale))
            # weighted as the pooled histograms are (a site's pairs by its scale squared), so a site that claims a
            # huge split of tied scores cannot set the share alone
            above = tied_pairs_above([(f["hist_neg"] * k, f["hist_pos"] * k, self.sites.get(site, {}).get(f"{split}_auc"))
                                      for (site, f), k in zip(named, scale)])
            return histogram_auc(neg, pos, above)
        from sklearn.metrics import roc_auc_score

        parts = [rows_log_probabilities(f["preds"]) for f in figs]
        logp = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        w = np.concatenate([cnt * k for (_, _, cnt), k in zip(parts, scale)])
        probs = np.exp(logp - logp.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        present = [c for c in range(num_classes) if np.any((y == c) & (w > 0))]
        if len(present) < 2:
            return float("nan")
        return float(np.mean([roc_auc_score(y == c, probs[:, c], sample_weight=w) for c in present]))

    def choose_decision(self, num_classes: int, weight_cap: float = POOLED_WEIGHT_CAP,
                        trim_from: int = TRIM_SITES_FROM) -> Decision:
        """The federation's decision rule from the sites' validation releases, each site counting at most
        ``weight_cap`` × the median site's examples (scaled down, as the pooled figures' weights are:
        :func:`fedtl.evaluation.pooled`), so a site that claims a huge validation split cannot place it alone.
        Binary: a threshold from the pooled histograms (:func:`threshold_from_histograms`); multi-class: per-class
        offsets from the pooled prediction rows (:func:`fedtl.evaluation.bias_from_log_probabilities`, the central
        rule's search), judged with ``trim_from`` or more sites by the accuracy of all sites but the best and the
        worst at each candidate (one site's made-up rows would otherwise win an accuracy search whatever its
        weight cap); the argmax when there is nothing to choose on or nothing beats it."""
        if num_classes == 2:
            return self._threshold(weight_cap)
        rows = [f["val"]["preds"] for f in self.raw.values() if "preds" in f.get("val", {})]
        if not rows:
            return Decision()
        counts = [float(r[:, -1].sum()) for r in rows]
        parts = [rows_log_probabilities(r) for r in rows]  # (log-probabilities, labels, counts) per site
        w = np.concatenate([cnt * k for (_, _, cnt), k in zip(parts, site_scales(counts, weight_cap))])
        site = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])
        images = int(sum(counts))
        bias = bias_from_log_probabilities(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                           w, examples=images, groups=site, trim=1 if len(rows) >= trim_from else 0)
        if bias is None:
            return Decision()
        return Decision("bias", chosen_on=f"federated validation ({images} images, {len(rows)} sites)",
                        bias=tuple(float(b) for b in bias))

    def _threshold(self, weight_cap: float) -> Decision:
        figs = [f["val"] for f in self.raw.values() if "hist_neg" in f.get("val", {})]
        if not figs:
            return Decision()
        counts = [float(f["hist_neg"].sum() + f["hist_pos"].sum()) for f in figs]
        scale = site_scales(counts, weight_cap)
        neg = sum(f["hist_neg"] * k for f, k in zip(figs, scale))
        pos = sum(f["hist_pos"] * k for f, k in zip(figs, scale))
        t = threshold_from_histograms(neg, pos)
        if t is None:
            return Decision()
        return Decision("threshold", t, 1, f"federated validation ({int(sum(counts))} images, {len(figs)} sites)")

    def apply(self, decision: Decision) -> None:
        """Per-site accuracy at ``decision``: a threshold from the histograms (exact), per-class offsets from the
        prediction rows (to within their rounding, ties shared; a sampled split's rows: on the sample)."""
        self.decision = decision
        for site, figs in self.raw.items():
            row = self.sites[site]
            for s in SPLITS:
                f = figs.get(s, {})
                row[f"{s}_acc_argmax"] = f.get("acc", float("nan"))
                if decision.rule == "threshold" and "hist_neg" in f:
                    row[f"{s}_acc"] = accuracy_at(f, decision.threshold)
                elif decision.rule == "bias" and "preds" in f:
                    row[f"{s}_acc"] = rows_accuracy(f["preds"], decision)
                elif decision.rule != "argmax" and f.get("n"):  # it releases no scores: its accuracy at the rule is
                    row[f"{s}_acc"] = float("nan")  # unknown (its argmax accuracy stays in *_acc_argmax)


def ask_sites(grid, strategy, result, message_type: str, arrays: ArrayRecord, config: ConfigRecord, *,
              timeout: float, parse, what: str) -> None:
    """Send ``arrays`` and ``config`` as ``message_type`` to every connected site and put each reply that arrives
    within ``timeout`` into ``result`` (a :class:`SiteEvaluation` or a ``personalize.Personalization``).

    ``parse(content)`` validates a reply into (site name claimed, figures, reason), which ``result.add`` records
    under that name (another node's already: ``"<name> (node <id>)"``; none: the node's own name). A failed or
    rejected reply (logged: "<what> reply from … rejected") goes to ``result.skipped``, never ending the run;
    nodes that did not answer, to ``result.timed_out``."""
    from fedtl.federation.polling import destinations, reply_node, send_and_receive

    node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                        message_type=message_type) for node in node_ids]
    replies = send_and_receive(grid, messages, timeout=timeout) if messages else []  # polled every 0.2 s
    sent = destinations(messages)
    answered = set()
    for reply in replies:
        node = reply_node(reply, sent)
        answered.add(node)
        fallback = strategy.site_name(node)
        if reply.has_error():
            result.skipped[fallback] = f"failed: {reply.error.reason}"[:500]
            continue
        try:
            site, parsed, reason = parse(reply.content)
        except Exception as exc:  # any malformed reply is that reply's rejection, never the run's end
            result.skipped[fallback] = f"rejected: {exc}"[:500]
            log.warning("%s reply from %s rejected: %s", what, fallback, exc)
            continue
        site = site or fallback
        if site in result.sites or site in result.skipped:  # two nodes claiming one name: keep both, visibly
            site = f"{site} (node {node})"
        result.add(site, parsed, reason)
    result.timed_out = sorted(strategy.site_name(n) for n in set(node_ids) - answered)


def evaluate_at_sites(grid, strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                      timeout: float, num_classes: int) -> SiteEvaluation:
    """Send ``arrays`` to every connected site for evaluation; collect validated figures within ``timeout``."""
    config = ConfigRecord({**dict(config), "server-round": server_round})
    t0 = time.perf_counter()
    result = SiteEvaluation()
    ask_sites(grid, strategy, result, MessageType.EVALUATE, arrays, config, timeout=timeout,
              parse=lambda content: parse_eval_reply(content, num_classes), what=f"Round {server_round}: evaluation")
    log.debug("Round %d: federated evaluation at %d sites in %.2f s", server_round, len(result.sites),
              time.perf_counter() - t0)
    return result
