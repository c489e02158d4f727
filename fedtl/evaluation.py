"""Evaluation figures shared by the server and the sites: AUC/accuracy/loss, decision thresholds,
score histograms (what a site releases to calibrate a threshold), pooled figures, a site's
validation/test split.

Binary tasks: accuracy is taken at a decision threshold chosen on *validation* data (never on
test data), because a suffix trained on one class mix puts its argmax in the wrong place for
another. The threshold is a bin edge of the score histograms — the server's own validation
scores (central evaluation) or the sites' released ones (federated evaluation), so both paths
pick it the same way and per-site accuracy at it is exact — in the middle of the edges with near-best
balanced accuracy (Youden's J), which does not depend on the validation split's class mix.
"""

from __future__ import annotations

import json

import numpy as np

from fedtl.weighting import aggregation_weights
from fedtl.decision import METADATA_KEY, Decision, decision_from_metadata

HIST_BINS = 50  # score histogram bins a site releases per class (binary tasks), on [0, 1]
POOLED_WEIGHT_CAP = 4.0  # a site's weight in pooled federated figures and histograms: at most this × the median n
PLATEAU_SE = 2.0  # threshold: the edges within this many standard errors of the best balanced accuracy are near-best
DECISION_KEY = METADATA_KEY  # safetensors metadata key of the suffix's decision rule (fedtl.decision)
# validation images of each class it holds that a site needs to weigh a personal candidate (auc_gain_bound) or to
# choose its own decision rule: a class of m images has C(2m-1, m) distinct resamples (1, 3, 10, 35, 126, m = 1 … 5)
MIN_PER_CLASS = 5


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
    p, y = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    k = p.shape[1]
    if k < 2 or len(y) < 5 * k or len(np.unique(y)) < 2:
        return None
    logp = np.log(np.clip(p, 1e-30, None))

    def acc(b: np.ndarray) -> float:
        return float(np.mean((logp + b).argmax(1) == y))

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
    A site's undefined AUC (one class) is left out of the AUC mean."""
    out: dict[str, float] = {}
    sized = [r for r in rows if r.get(f"{prefix}_n", 0) > 0]
    if not sized:
        return {f"{prefix}_auc": float("nan"), f"{prefix}_acc": float("nan"), f"{prefix}_loss": float("nan"), f"{prefix}_n": 0}
    w = np.array(aggregation_weights([float(r[f"{prefix}_n"]) for r in sized], "examples", weight_cap))
    keys = ("auc", "acc", "loss") + (("acc_argmax",) if all(f"{prefix}_acc_argmax" in r for r in sized) else ())
    for key in keys:
        vals = np.array([float(r[f"{prefix}_{key}"]) for r in sized])
        ok = np.isfinite(vals)
        out[f"{prefix}_{key}"] = float(np.average(vals[ok], weights=w[ok])) if ok.any() and w[ok].sum() > 0 else float("nan")
    out[f"{prefix}_n"] = int(sum(r[f"{prefix}_n"] for r in sized))
    return out


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
