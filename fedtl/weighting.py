"""How much each accepted update counts in a round's average (``federation.weighting``, ``federation.weight-cap``):
used by the strategy and by the pooling of the sites' evaluation figures."""

from __future__ import annotations


def aggregation_weights(reported: list[float], weighting: str, weight_cap: float) -> list[float]:
    """The weight each accepted update gets in a round, from the example counts the sites reported
    (untrusted, rounded): ``examples`` — the count, capped at ``weight_cap`` × the round's median (0: no cap);
    ``sites`` — 1 each.

    The default, examples capped at the median (``weight_cap = 1``): a small site's update, mostly DP noise,
    keeps its small weight, and a large site weighs no more than the median one. With FedAvg's weights (no
    cap, or 4 × the median) a large site of (almost) one class pulled the average towards predicting that
    class and one partition in five lost 0.02–0.05 test AUC; one weight per site lost at ε = 1, where the
    small sites' noise counts (docs/benchmarks.md, "Aggregation weights").
    """
    import statistics

    if weighting == "sites":
        return [1.0] * len(reported)
    if weighting != "examples":
        raise ValueError(f"weighting must be 'sites' or 'examples', got {weighting!r}")
    if weight_cap <= 0 or not reported:
        return [float(w) for w in reported]
    cap = weight_cap * float(statistics.median(reported))
    return [min(float(w), cap) for w in reported]
