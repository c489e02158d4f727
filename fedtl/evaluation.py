"""Evaluation figures shared by the server and the sites: AUC/accuracy/loss, decision thresholds,
score histograms (what a site releases to calibrate a threshold), pooled figures, a site's
validation/test split.

Binary tasks: accuracy is taken at a decision threshold chosen on *validation* data (never on
test data), because a suffix trained on one class mix puts its argmax in the wrong place for
another. The threshold is a bin edge of the score histograms — the server's own validation
scores (central evaluation) or the sites' released ones (federated evaluation), so both paths
pick it the same way and per-site accuracy at it is exact — in the middle of the edges with near-best
balanced accuracy (Youden's J), which does not depend on the validation split's class mix.

Multi-class tasks: per-class offsets to the log-probabilities, chosen for accuracy on validation data — the
server's own, or the sites' released prediction rows (:func:`prediction_rows`: each evaluation image's label and
its log-probabilities relative to its most likely class, rounded to :data:`PRED_STEP`), the multi-class
counterpart of the binary histograms, so both paths choose the offsets the same way; per-site accuracy at them is
exact at the argmax and within the rows' rounding at offsets (classes the rounding ties count a fair share each).
"""

from __future__ import annotations

import json
import math

import numpy as np

from fedtl.weighting import aggregation_weights
from fedtl.decision import METADATA_KEY, Decision, decision_from_metadata

HIST_BINS = 50  # score histogram bins a site releases per class (binary tasks), on [0, 1]
FIGURE_DECIMALS = 6  # a site's reported figures (AUC, accuracy, loss) are rounded to this many decimals
POOLED_WEIGHT_CAP = 4.0  # a site's weight in pooled federated figures and histograms: at most this × the median n
PLATEAU_SE = 2.0  # threshold: the edges within this many standard errors of the best balanced accuracy are near-best
DECISION_KEY = METADATA_KEY  # safetensors metadata key of the suffix's decision rule (fedtl.decision)
# validation images of each class it holds that a site needs to weigh a personal candidate (auc_gain_bound) or to
# choose its own decision rule: a class of m images has C(2m-1, m) distinct resamples (1, 3, 10, 35, 126, m = 1 … 5)
MIN_PER_CLASS = 5
# multi-class tasks: a site releases each evaluation image's log-probabilities relative to its most likely class,
# rounded to PRED_STEP (the offsets' own step) and floored at -PRED_FLOOR steps (-8: no offset pair within ±4 can
# bring a class further down back), as a multiset with its label; at most MAX_PRED_VALUES integers per split
PRED_STEP = 0.1
PRED_FLOOR = 80
MAX_PRED_VALUES = 400_000


def max_prediction_images(num_classes: int) -> int:
    """The most images whose prediction rows a site sends for one split (a seeded sample of a larger split)."""
    return MAX_PRED_VALUES // (num_classes + 2)


def prediction_rows(probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[int]:
    """What a site releases of a multi-class evaluation split for the federation's decision rule: the multiset of
    (label, q_0 … q_{K-1}) with q_j = round((log p_j − max log p) / PRED_STEP) floored at −PRED_FLOOR (and at most
    −1 for every class but the most likely, so the argmax is exact), as flat rows
    ``label, q_0, …, q_{K-1}, count`` sorted (no image order survives). A split larger than
    :func:`max_prediction_images` is sampled (seeded) to that many images."""
    p, y = np.asarray(probs, dtype=float), np.asarray(labels).astype(np.int64)
    k = p.shape[1]
    cap = max_prediction_images(k)
    if len(y) > cap:
        keep = np.sort(np.random.default_rng(seed).choice(len(y), cap, replace=False))
        p, y = p[keep], y[keep]
    logp = np.log(np.clip(p, 1e-300, None))
    q = np.maximum(np.round((logp - logp.max(axis=1, keepdims=True)) / PRED_STEP), -PRED_FLOOR).astype(np.int64)
    top = logp.argmax(axis=1)
    runner_up = np.ones_like(q, dtype=bool)
    runner_up[np.arange(len(q)), top] = False
    q[runner_up & (q == 0)] = -1  # a class just below the most likely one stays below it: the argmax survives rounding
    rows, counts = np.unique(np.column_stack([y, q]), axis=0, return_counts=True)
    return np.column_stack([rows, counts]).ravel().astype(int).tolist()


def rows_log_probabilities(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked prediction rows (R, K + 2) → (relative log-probabilities (R, K), labels (R,), counts (R,))."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[:, 1:-1] * PRED_STEP, rows[:, 0], rows[:, -1]


def rows_accuracy(rows: np.ndarray, decision: Decision) -> float:
    """Accuracy of a multi-class decision (argmax or per-class offsets) on prediction rows, counting each row's
    images."""
    logp, y, counts = rows_log_probabilities(rows)
    bias = np.asarray(decision.bias) if decision.rule == "bias" else np.zeros(logp.shape[1])
    return float(np.sum(counts * expected_correct(logp + bias, y)) / max(1, counts.sum()))


def expected_correct(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, the chance that the argmax of ``scores`` is the label with ties broken at random: 1 or 0 unless the
    best scores tie (rounded prediction rows plus offsets on the same grid can), then 1 / (tied classes) if the label
    is among them."""
    best = scores >= scores.max(axis=1, keepdims=True) - 1e-9
    return best[np.arange(len(labels)), labels] / best.sum(axis=1)


def auc_of(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (binary) or macro one-vs-rest AUC (multi-class, as MedMNIST reports it); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:  # OvR per present class; absent classes have no AUC
        return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


def decision_of(body: dict | None) -> Decision:
    """The rule a run recorded as a JSON object (``metrics.jsonl``'s ``decision``); none recorded: argmax."""
    return decision_from_metadata({METADATA_KEY: json.dumps(body)}) if body else Decision()


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = HIST_BINS) -> tuple[list[int], list[int]]:
    """Per-class counts of positive-class scores over ``bins`` equal bins of [0, 1]: (negatives, positives)."""
    idx = np.clip((np.asarray(scores) * bins).astype(np.int64), 0, bins - 1)
    labels = np.asarray(labels)
    neg = np.bincount(idx[labels == 0], minlength=bins)[:bins]
    pos = np.bincount(idx[labels == 1], minlength=bins)[:bins]
    return neg.astype(int).tolist(), pos.astype(int).tolist()


def threshold_from_histograms(neg: np.ndarray, pos: np.ndarray) -> float | None:
    """The decision threshold for pooled score histograms: of the bin edges whose balanced accuracy is within
    :data:`PLATEAU_SE` standard errors of the best edge's (binomial, from that edge's TPR and TNR and the class
    counts), the middle one (the lower of two); ``None`` when either class is empty. Edge k predicts positive for
    scores ≥ k / bins.

    Balanced accuracy is flat near its best, so the single best edge of a few hundred validation images jumps
    between runs of the same model family (0.42 in one seed, 0.68–0.80 in four); the middle of the near-best edges
    moves half as much and scored higher on held-out halves of the validation splits (docs/benchmarks.md,
    "The decision threshold")."""
    neg, pos = np.asarray(neg, dtype=float), np.asarray(pos, dtype=float)
    if neg.sum() <= 0 or pos.sum() <= 0:
        return None
    bins = len(neg)
    edges = np.arange(bins + 1) / bins
    tpr = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]]) / pos.sum()  # P(score >= edge | positive)
    tnr = np.concatenate([[0.0], np.cumsum(neg)]) / neg.sum()  # P(score < edge | negative)
    j = tpr + tnr
    b = int(np.argmax(j))
    se = np.sqrt(tpr[b] * (1 - tpr[b]) / pos.sum() + tnr[b] * (1 - tnr[b]) / neg.sum())
    near = np.flatnonzero(j >= j[b] - PLATEAU_SE * se - 1e-12)
    return float(edges[near[(len(near) - 1) // 2]])


def bias_from_probabilities(probs: np.ndarray, labels: np.ndarray, grid: float = 4.0, step: float = 0.1,
                            sweeps: int = 3) -> np.ndarray | None:
    """Per-class offsets to the log-probabilities (class 0's fixed at 0) with the best accuracy on these
    (validation) examples: a coordinate search over ``[-grid, grid]``, ties broken toward the smaller offset.
    ``None`` when the data cannot support it (fewer than 5 examples per class, one class) or no offset beats the
    argmax, so a model is never moved off its argmax by a validation set too small to say so."""
    p = np.asarray(probs, dtype=float)
    return bias_from_log_probabilities(np.log(np.clip(p, 1e-30, None)), labels, grid=grid, step=step, sweeps=sweeps)


def bias_from_log_probabilities(logp: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
                                examples: int | None = None, groups: np.ndarray | None = None, trim: int = 0,
                                grid: float = 4.0, step: float = 0.1, sweeps: int = 3) -> np.ndarray | None:
    """:func:`bias_from_probabilities` on (relative) log-probabilities, each row counting ``weights`` (default 1)
    in the accuracy; ``examples``: the images the rows stand for (default: one a row), for the size check.

    ``groups`` (one integer per row: the site it came from) with ``trim`` > 0: the accuracy each candidate is
    judged by leaves out, for that candidate, the ``trim`` groups with the highest and the ``trim`` with the lowest
    accuracy (a weighted trimmed mean of the groups' accuracies), so that no one group's rows can pull the offsets
    toward what suits them alone — a site that made its rows up is either the best or the worst at the offsets
    it pulls toward."""
    logp, y = np.asarray(logp, dtype=float), np.asarray(labels).astype(int)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    k = logp.shape[1]
    n = len(y) if examples is None else examples
    if k < 2 or n < 5 * k or len(np.unique(y[w > 0])) < 2 or w.sum() <= 0:
        return None
    g = np.zeros(len(y), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    group_w = np.bincount(g, weights=w)
    trim = trim if len(group_w) > 2 * trim else 0

    def acc(b: np.ndarray) -> float:
        correct = w * expected_correct(logp + b, y)
        if not trim:
            return float(correct.sum() / w.sum())
        per_group = np.bincount(g, weights=correct, minlength=len(group_w)) / np.maximum(group_w, 1e-300)
        kept = np.argsort(per_group, kind="stable")[trim:len(per_group) - trim]
        return float(np.sum(per_group[kept] * group_w[kept]) / max(group_w[kept].sum(), 1e-300))

    bias, base = np.zeros(k), acc(np.zeros(k))
    values = np.round(np.arange(-grid, grid + step / 2, step), 10)
    values = values[np.argsort(np.abs(values), kind="stable")]  # max() keeps the first best: the smallest offset
    for _ in range(sweeps):
        for c in range(1, k):
            trial = bias.copy()

            def score(v: float) -> float:
                trial[c] = v
                return acc(trial)

            bias[c] = max(values, key=score)
    return bias if acc(bias) > base else None


def central_decision(probs: np.ndarray, labels: np.ndarray, mode: str = "threshold") -> Decision:
    """The decision rule chosen on the server's own validation data (``probs`` (N, K), ``labels`` (N,)):
    binary, the middle of the near-best balanced-accuracy thresholds (:func:`threshold_from_histograms`);
    multi-class, per-class offsets (kept only if they beat the argmax); ``mode="argmax"`` or no usable data: the
    argmax."""
    n, k = (probs.shape[0], probs.shape[1]) if np.ndim(probs) == 2 else (0, 0)
    if mode != "threshold" or n == 0:
        return Decision()
    where = f"central validation ({n} images)"
    if k == 2:
        th = threshold_from_histograms(*score_histograms(probs[:, 1], np.asarray(labels)))
        return Decision("threshold", th, 1, where) if th is not None else Decision()
    bias = bias_from_probabilities(probs, labels)
    return Decision("bias", chosen_on=where, bias=tuple(bias)) if bias is not None else Decision()


def pooled(rows: list[dict], prefix: str, weight_cap: float = POOLED_WEIGHT_CAP) -> dict[str, float]:
    """Example-weighted means of the sites' figures; each site's weight capped at ``weight_cap`` × the
    median weight (0: no cap), so one site claiming a huge n cannot decide the pooled figure alone.
    A site's undefined AUC (one class) is left out of the AUC mean. Rounded to the 6 decimals a site reports
    (``fedeval``), so a mean of rounded figures does not show digits no site sent."""
    out: dict[str, float] = {}
    sized = [r for r in rows if r.get(f"{prefix}_n", 0) > 0]
    if not sized:
        return {f"{prefix}_auc": float("nan"), f"{prefix}_acc": float("nan"), f"{prefix}_loss": float("nan"), f"{prefix}_n": 0}
    w = np.array(aggregation_weights([float(r[f"{prefix}_n"]) for r in sized], "examples", weight_cap))
    keys = ("auc", "acc", "loss") + (("acc_argmax",) if all(f"{prefix}_acc_argmax" in r for r in sized) else ())
    for key in keys:
        vals = np.array([float(r[f"{prefix}_{key}"]) for r in sized])
        ok = np.isfinite(vals)
        out[f"{prefix}_{key}"] = (round(float(np.average(vals[ok], weights=w[ok])), FIGURE_DECIMALS)
                                  if ok.any() and w[ok].sum() > 0 else float("nan"))
    out[f"{prefix}_n"] = int(sum(r[f"{prefix}_n"] for r in sized))
    return out


def sites_auc(row: dict, split: str, prefix: str = "fed_") -> float:
    """The sites' AUC of ``split`` in a metrics row (``prefix`` "fed_") or a per-site table's pooled figures
    (``prefix`` ""): one AUC over all their released images (``…_auc_pooled``), or, where none released them, the
    mean of their AUCs (``…_auc``). The mean of ten sites' AUCs over a few dozen images each is another figure than
    a central test split's: on RetinaMNIST's test split (5 runs, Dirichlet sites) it was 0.016–0.035 off the AUC
    over all 400 images, the pooled one within 0.003."""
    pooled = row.get(f"{prefix}{split}_auc_pooled", math.nan)
    pooled = math.nan if pooled is None else pooled
    return pooled if math.isfinite(pooled) else row.get(f"{prefix}{split}_auc", math.nan)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, rest) with ``fraction`` of each class in ``first`` (at least one of a class with
    two or more examples), reproducible from ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        first.extend(idx[:k].tolist())
    first_arr = np.array(sorted(first), dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), first_arr)
    return first_arr, rest


def _bootstrap_aucs(probs: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """AUC (binary) or macro one-vs-rest AUC of each resample ``rows[b]`` at once (Mann–Whitney on ranks,
    ties averaged: what :func:`auc_of` computes, vectorized over resamples; sklearn's per-call checks cost
    ~6 ms each, 12 s for a 1,000-resample comparison)."""
    from scipy.stats import rankdata

    y = labels[rows[0]]  # stratified resamples: every row holds the same labels in the same order
    classes = [1] if probs.shape[1] == 2 else list(np.unique(y))
    out = np.zeros(len(rows))
    for c in classes:
        pos = y == c
        n1, n0 = int(pos.sum()), int((~pos).sum())
        ranks = rankdata(probs[rows, c], axis=1)
        out += (ranks[:, pos].sum(axis=1) - n1 * (n1 + 1) / 2) / (n0 * n1)
    return out / len(classes)


def too_few_to_weigh(labels, min_per_class: int = MIN_PER_CLASS) -> int:
    """The size of the smallest class present in ``labels`` when it is below ``min_per_class`` (else 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
    return smallest if smallest < min_per_class else 0


def auc_gain_bound(base: np.ndarray, candidate: np.ndarray, labels: np.ndarray, *, confidence: float = 0.9,
                   resamples: int = 1000, seed: int = 0, min_per_class: int = MIN_PER_CLASS) -> float:
    """A one-sided lower confidence bound on ``AUC(candidate) − AUC(base)`` over the same examples: the
    ``1 − confidence`` quantile of the paired, class-stratified bootstrap of the difference (each resample
    keeps every class's count, so each has an AUC). ``base``/``candidate``: (N, K) probabilities. NaN when
    the AUC is undefined (fewer than two classes) or a class it holds has fewer than ``min_per_class`` examples:
    the resamples cannot vary such a class (one image is the same image in every resample), so the "bound" would be
    the point gain — 6 validation images let a simulated RetinaMNIST site keep a local head at 0.70 → 1.00 that lost
    0.035 test AUC. A bound above 0 is evidence the candidate ranks better on data like these; a point difference
    of 0.0001 on 100 images is not.
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2 or len(labels) != len(base) or len(labels) != len(candidate):
        return float("nan")
    if too_few_to_weigh(labels, min_per_class):
        return float("nan")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"confidence must be in (0, 1) and resamples >= 1, got {confidence}, {resamples}")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rows = np.concatenate([rng.choice(ix, size=(resamples, len(ix)), replace=True) for ix in by_class], axis=1)
    gains = _bootstrap_aucs(np.asarray(candidate), labels, rows) - _bootstrap_aucs(np.asarray(base), labels, rows)
    return float(np.quantile(gains, 1 - confidence))
