"""Privacy accounting with Opacus' accountants, over a carried history."""

from __future__ import annotations

import functools
import math
import warnings

from fedtl.errors import PrivacyBudgetError


def make_accountant(name: str, history: list[tuple[float, float, int]] | None = None):
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=name)
    acc.history = [tuple(h) for h in (history or [])]
    return acc


ACCOUNTANTS = ("rdp", "prv")  # Opacus' GDP accountant under-estimates composition: not offered


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Cumulative ε of a history at δ. RDP composes additively, so per-(σ, q) RDP curves are
    memoized and scaled by step counts: same result as Opacus' RDPAccountant, computed once."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not history:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    with warnings.catch_warnings():
        # RDP notes when the optimal order is at the edge of its alpha grid; the bound is still valid.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(make_accountant(accountant, history).get_epsilon(delta=delta))


MAX_SIGMA = 100.0  # beyond this ε no longer falls (the δ term of the RDP conversion dominates)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: list[tuple[float, float, int]] | None = None, accountant: str = "rdp",
                    tolerance: float = 0.01, max_sigma: float = MAX_SIGMA) -> float:
    """Smallest noise multiplier (within ``tolerance`` in ε) such that the prior history plus
    ``steps`` more steps at ``sample_rate`` stays within ``target_epsilon``; searched in ``(0, max_sigma]``,
    :class:`PrivacyBudgetError` when even ``max_sigma`` does not reach it (one bound check, no search)."""
    prior = list(prior or [])
    spent = epsilon_of(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(f"ε={spent:.3f} is already spent of the budget {target_epsilon}; no step can be taken.")

    def eps(sigma: float) -> float:
        return epsilon_of(prior + [(sigma, sample_rate, steps)], delta, accountant)

    max_sigma = min(float(max_sigma), MAX_SIGMA)
    if eps(max_sigma) > target_epsilon:  # an impossible budget: say so at once, not after a long search
        raise PrivacyBudgetError(
            f"No noise multiplier reaches ε ≤ {target_epsilon} for {steps} steps at sample rate {sample_rate:.4f}."
        )

    def eps_int(sigma: float) -> float:
        return _rdp_epsilon(prior + [(sigma, sample_rate, steps)], delta, integer_orders=True)

    if accountant == "rdp" and eps_int(max_sigma) <= target_epsilon:
        # Bracket on the integer orders alone (a twentieth of the cost), then refine on all of Opacus' orders.
        bound = _bisect(eps_int, target_epsilon, 0.0, max_sigma, tolerance)
        return _refine(eps, target_epsilon, bound, tolerance)
    return _bisect(eps, target_epsilon, 0.0, max_sigma, tolerance)


def _refine(eps, target_epsilon: float, high: float, tolerance: float) -> float:
    """Lower a valid σ (ε(high) ≤ target) until ε is within ``tolerance`` of the target: secant steps on
    log ε against log σ (ε falls about as 1/σ), kept inside a bracket, a few evaluations instead of a bisection's."""
    e_high, aim = eps(high), target_epsilon - tolerance / 2
    low, e_low = 0.0, math.inf
    for _ in range(100):
        if target_epsilon - e_high < tolerance or high - low < 1e-4:
            return high
        if low > 0:
            t = (math.log(e_low) - math.log(aim)) / (math.log(e_low) - math.log(e_high))
            mid = math.exp(math.log(low) + t * (math.log(high) - math.log(low)))
            mid = min(max(mid, low + 0.05 * (high - low)), high - 0.05 * (high - low))
        else:  # no lower end yet: ε ∝ 1/σ
            mid = high * max(e_high, 1e-12) / aim
        e = eps(mid)
        if e > target_epsilon:
            low, e_low = mid, e
        else:
            high, e_high = mid, e
    return high


def _bisect(eps, target_epsilon: float, low: float, max_sigma: float, tolerance: float) -> float:
    """Smallest σ in (low, max_sigma] found by bisection with ε(σ) ≤ target within ``tolerance`` (ε(max_sigma) ≤ target)."""
    high = min(max(10.0, 2 * low), max_sigma)
    while eps(high) > target_epsilon:
        low, high = high, min(high * 2, max_sigma)
    while True:
        mid = (low + high) / 2
        e = eps(mid)
        if e > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - e < tolerance or high - low < 1e-4:
                break
    if not math.isfinite(high):
        raise PrivacyBudgetError("noise calibration failed")
    return high


def _orders(integer_orders: bool) -> tuple[float, ...]:
    from opacus.accountants.rdp import RDPAccountant

    alphas = tuple(RDPAccountant.DEFAULT_ALPHAS)
    return tuple(a for a in alphas if float(a).is_integer()) if integer_orders else alphas


@functools.lru_cache(maxsize=4096)
def _rdp_curve(sigma: float, q: float, integer_orders: bool = False) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_orders(integer_orders)))


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float, integer_orders: bool = False) -> float:
    """ε of Opacus' RDP accountant (its default orders); ``integer_orders``: on the integer orders alone, an upper
    bound of it (a minimum over fewer orders) that costs a twentieth (the fractional orders need a series)."""
    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(np.asarray(_rdp_curve(float(s), float(q), integer_orders)) * int(n) for s, q, n in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        eps, _ = get_privacy_spent(orders=list(_orders(integer_orders)), rdp=rdp, delta=delta)
    return float(eps)
