"""``fedtl plan``: what DP will do to each site's updates, before any round is run.

For each site (its number of training images n) and the run's schedule (rounds, batch size,
local epochs) under a privacy policy (ε, δ, caps), the plan gives the noise multiplier σ the site
will calibrate, the ε it spends per round and in total, and the **noise-to-signal ratio** of one
round's update:

    NSR = σ · √d / (B · √k)

with d trainable parameters, B the expected batch (q · n) and k DP steps per round: the Gaussian
noise added to a round's summed, clipped gradients has norm ≈ σC√(dk), while the signal is at most
C per example and step, BkC when every clipped gradient agrees. NSR ≥ 1 means a site's update is
mostly noise; averaging over S sites divides the noise by about √S (``federation NSR``). The
numbers are an upper bound on the signal (real gradients do not all agree), so a plan saying
"noise" is reliable, one saying "ok" is necessary rather than sufficient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from fedtl.privacy.policy import steps_per_epoch

NOISY, NOISE = 0.5, 1.0  # NSR thresholds of the verdicts


@dataclass(frozen=True)
class Budget:
    target_epsilon: float
    delta: float
    round_cap: float
    run_cap: float
    max_noise_multiplier: float
    accountant: str = "rdp"


@dataclass
class SitePlan:
    site: str
    n: int
    batch: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    sigma: float  # inf: no σ fits the policy
    epsilon_per_round: float
    epsilon_total: float
    nsr: float
    verdict: str  # ok | noisy | noise | declines
    advice: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1024)
def _sigma(budget: Budget, q: float, steps: int, rounds: int) -> float:
    from fedtl.errors import PrivacyBudgetError
    from fedtl.privacy.accounting import calibrate_noise

    try:
        s = [calibrate_noise(budget.target_epsilon if budget.run_cap >= budget.target_epsilon else budget.run_cap,
                             budget.delta, q, rounds * steps, accountant=budget.accountant),
             calibrate_noise(budget.round_cap, budget.delta, q, steps, accountant=budget.accountant)]
    except PrivacyBudgetError:
        return math.inf
    return max(s)


def nsr(sigma: float, params: int, batch: float, steps: int) -> float:
    return sigma * math.sqrt(params) / (max(batch, 1e-9) * math.sqrt(max(steps, 1))) if math.isfinite(sigma) else math.inf


def plan_site(site: str, n: int, *, rounds: int, batch_size: int, epochs: int, params: int, budget: Budget,
              advise: bool = True) -> SitePlan:
    from fedtl.privacy.accounting import epsilon_of

    batch = max(1, min(batch_size, n))
    per_epoch = steps_per_epoch(n, batch)
    q, k = 1.0 / per_epoch, per_epoch * epochs
    sigma = _sigma(budget, q, k, rounds)
    expected_batch = q * n
    if math.isfinite(sigma):
        per_round = epsilon_of([(sigma, q, k)], budget.delta, budget.accountant)
        total = epsilon_of([(sigma, q, k * rounds)], budget.delta, budget.accountant)
    else:
        per_round = total = math.inf
    ratio = nsr(sigma, params, expected_batch, k)
    if not math.isfinite(sigma) or sigma > budget.max_noise_multiplier:
        verdict = "declines"
    else:
        verdict = "noise" if ratio >= NOISE else "noisy" if ratio >= NOISY else "ok"
    plan = SitePlan(site, n, batch, q, k, rounds, sigma, per_round, total, ratio, verdict)
    if advise and verdict != "ok":
        plan.advice = _advice(plan, epochs=epochs, params=params, budget=budget)
    return plan


def _advice(plan: SitePlan, *, epochs: int, params: int, budget: Budget) -> list[str]:
    """What would bring the update above the noise: each alternative measured by the same formula."""
    out = []
    for rounds in sorted({max(1, plan.rounds // 2), max(1, plan.rounds // 4), min(plan.rounds, 10)}, reverse=True):
        if rounds < plan.rounds:
            alt = plan_site(plan.site, plan.n, rounds=rounds, batch_size=plan.batch, epochs=epochs, params=params,
                            budget=budget, advise=False)
            out.append(f"{rounds} rounds: σ={alt.sigma:.2f}, NSR {alt.nsr:.2f}")
    if plan.batch < plan.n:
        alt = plan_site(plan.site, plan.n, rounds=plan.rounds, batch_size=plan.n, epochs=epochs, params=params,
                        budget=budget, advise=False)
        out.append(f"full batches (train.batch-size ≥ {plan.n}): σ={alt.sigma:.2f}, NSR {alt.nsr:.2f}")
    bigger = Budget(budget.target_epsilon * 2, budget.delta, budget.round_cap * 2, budget.run_cap * 2,
                    budget.max_noise_multiplier, budget.accountant)
    alt = plan_site(plan.site, plan.n, rounds=plan.rounds, batch_size=plan.batch, epochs=epochs, params=params,
                    budget=bigger, advise=False)
    out.append(f"twice the budget (ε={bigger.target_epsilon:g}): NSR {alt.nsr:.2f}")
    out.append(f"fewer trainable parameters (now {params}): NSR scales with √d")
    out.append("pooling this site's images with another site's doubles B and halves NSR")
    return out


def plan_simulation(cfg) -> tuple[list[SitePlan], int]:
    """Plans of the simulated sites of ``cfg`` (their partition sizes and budgets), and d."""
    from fedtl.federation.site import build_transfer_model, load_source, site_indices

    source = load_source(cfg.data.path)
    params = build_transfer_model(cfg, source.num_classes).param_counts()["trainable_params"]
    sizes = [len(site_indices(cfg, s, cfg.federation.sites)) for s in range(cfg.federation.sites)]
    return plan_sizes(cfg, sizes, params), params


def plan_sizes(cfg, sizes: list[int], params: int, advise: bool = True) -> list[SitePlan]:
    p = cfg.privacy
    budgets = p.site_budgets() if p.site_epsilons else ()
    plans = []
    for i, n in enumerate(sizes):
        eps = budgets[i] if i < len(budgets) else p.target_epsilon
        budget = Budget(eps, p.delta, p.max_epsilon_per_round or eps / 4, p.max_epsilon_per_run or eps,
                        p.max_noise_multiplier, p.accountant)
        plans.append(plan_site(f"site-{i}", n, rounds=min(cfg.federation.rounds, p.max_rounds_per_run),
                               batch_size=cfg.train.batch_size, epochs=cfg.train.epochs, params=params, budget=budget,
                               advise=advise))
    return plans


def federation_nsr(plans: list[SitePlan]) -> float:
    """NSR of one round's aggregate: the sites' updates averaged with FedAvg weights w ∝ n (independent
    noise adds in quadrature, signal linearly): √(Σ w²·NSR²) / Σ w."""
    live = [p for p in plans if p.verdict != "declines"]
    if not live:
        return math.inf
    w = [p.n for p in live]
    return math.sqrt(sum((wi * p.nsr) ** 2 for wi, p in zip(w, live))) / sum(w)


def format_plans(plans: list[SitePlan], params: int) -> list[str]:
    lines = [f"{'site':<10}{'n':>6}{'batch':>6}{'steps/rd':>9}{'rounds':>7}{'σ':>7}{'ε/round':>9}{'ε total':>8}"
             f"{'NSR':>7}  verdict"]
    for p in plans:
        sigma = f"{p.sigma:.2f}" if math.isfinite(p.sigma) else ">100"
        lines.append(f"{p.site:<10}{p.n:>6}{p.batch:>6}{p.steps_per_round:>9}{p.rounds:>7}{sigma:>7}"
                     f"{p.epsilon_per_round:>9.3f}{p.epsilon_total:>8.3f}{p.nsr:>7.2f}  {p.verdict}")
    fed = federation_nsr(plans)
    lines.append(f"trainable parameters d = {params}; federation NSR of a round's aggregate "
                 f"({sum(p.verdict != 'declines' for p in plans)} sites, FedAvg weights) = {fed:.2f}")
    bad = [p for p in plans if p.verdict in ("noise", "declines")]
    for p in bad[:5]:
        what = "will decline every round" if p.verdict == "declines" else "will send updates that are mostly noise"
        lines.append(f"! {p.site} ({p.n} images) {what}. What would help:")
        lines.extend(f"    - {a}" for a in p.advice)
    if len(bad) > 5:
        lines.append(f"! … and {len(bad) - 5} more such sites")
    if fed >= NOISE:
        lines.append("! The federation's aggregate update of a round is mostly noise: expect a model near chance. "
                     "Fewer rounds, larger batches or budgets, or pooled sites (see above) would help.")
    elif fed >= NOISY:
        lines.append("! The federation's aggregate update of a round is noisy: expect slow learning.")
    return lines


def warnings_for(plans: list[SitePlan]) -> list[str]:
    """The plan's warnings in a few lines (the check at the start of a simulation)."""
    out = []
    bad = [p for p in plans if p.verdict in ("noise", "declines")]
    if bad:
        names = ", ".join(f"{p.site} ({p.n} images, NSR {p.nsr:.1f})" for p in bad[:6]) + (" …" if len(bad) > 6 else "")
        fed = federation_nsr(plans)
        after = (f" The aggregate's NSR is {fed:.2f}: the federation learns from the others." if fed < NOISY else "")
        out.append(f"{len(bad)} of {len(plans)} sites will send updates that are mostly noise or decline: {names}. "
                   f"`fedtl plan` shows what would help.{after}")
    fed = federation_nsr(plans)
    if fed >= NOISY:
        out.append(f"The aggregate update of a round has a noise-to-signal ratio of {fed:.2f}: expect "
                   f"{'a model near chance' if fed >= NOISE else 'slow learning'} (`fedtl plan`).")
    return out
