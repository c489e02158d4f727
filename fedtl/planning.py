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

Over a run of R rounds the updates add up while their independent noise grows as √R: the
**run NSR** = NSR / √R compares schedules (rounds, batch) for the same budget. Measured on 10
PneumoniaMNIST sites of 50 and 100 images (docs/benchmarks.md, "Small sites"), test AUC followed
the run NSR, not the per-round NSR: 5 rounds had the lowest per-round NSR and the worst AUC (the
per-round ε cap leaves part of the budget unspent), 20–40 rounds the best. So the alternatives the
plan measures are ranked by run NSR, and ε is shown as what the schedule can actually spend.

A run with ``personalization.kind = "finetune"`` reserves each site's fine-tuning steps (after the last
round, same σ and sample rate) in the plan from round 1, as the site's policy does (``plan_round``): σ is
calibrated for rounds + fine-tuning under the budget (the per-round cap holds for the rounds alone), and
"ε total" includes the fine-tuning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from fedtl.config import FederationConfig
from fedtl.privacy.policy import UNSPENT_FRACTION, steps_per_epoch

NOISY, NOISE = 0.5, 1.0  # NSR thresholds of a site's verdict (its own update, one round)
# Thresholds of the federation's verdict, on the run NSR of the aggregate (per-round aggregate NSR / √rounds):
# measured (docs/benchmarks.md, "The plan's verdict"), the default PneumoniaMNIST federation reached test AUC
# 0.966 at 0.08 (ε = 3), 0.957–0.960 at 0.18–0.22 (ε = 1) and 0.939 at 0.43 (ε = 0.5), although every site's own
# update was "noise" at ε ≤ 1. At 1 the run's summed noise is as large as the largest possible signal.
RUN_NOISY, RUN_NOISE = 0.3, 1.0


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
    personalize_steps: int = 0  # fine-tuning steps reserved after the last round (in σ and ε total)
    epsilon_room: float = math.inf  # what the run may spend: the budget, or the per-run cap when lower

    @property
    def leaves_unspent(self) -> bool:
        """The per-round cap, not the budget, sets σ: the run spends under 90 % of what it may (and trains noisier)."""
        return math.isfinite(self.epsilon_total) and self.epsilon_total < UNSPENT_FRACTION * self.epsilon_room

    @property
    def run_nsr(self) -> float:
        """NSR of the sum of the run's updates: the noise of R rounds adds in quadrature, their signal linearly."""
        return self.nsr / math.sqrt(max(self.rounds, 1))


@functools.lru_cache(maxsize=1024)
def _sigma(budget: Budget, q: float, steps: int, rounds: int, extra_steps: int = 0) -> float:
    from fedtl.errors import PrivacyBudgetError
    from fedtl.privacy.accounting import calibrate_noise

    try:
        s = [calibrate_noise(budget.target_epsilon if budget.run_cap >= budget.target_epsilon else budget.run_cap,
                             budget.delta, q, rounds * steps + extra_steps, accountant=budget.accountant),
             calibrate_noise(budget.round_cap, budget.delta, q, steps, accountant=budget.accountant)]
    except PrivacyBudgetError:
        return math.inf
    return max(s)


def effective_params(model, lr_scale: float) -> int:
    """d for the NSR: the suffix's trainable parameters, each parameter group counted by its learning rate.

    A DP step moves each group by its own lr times (sum of clipped gradients + noise) / B: the adapter or unfrozen
    backbone weights at ``lr × lr_scale`` (``adapters.lr-scale``; 0.1 when unfreezing), the head at ``lr``. One
    example's clipped gradient moves the model by at most ``C · lr_max``, and the update's noise has norm
    ``σ C √(Σ_g (lr_g)² d_g) / B``, so d = Σ_g (lr_g / lr_max)² d_g: the unfrozen weights' noise counts
    ``lr_scale² = 0.01`` each. Counting every parameter alike put every site of an unfrozen ``block4_2`` (168,674
    parameters) at "noise" and the aggregate at run NSR 0.94; the run reached test AUC 0.961, validation 0.981
    (docs/benchmarks.md, "Fine-tuning more of the network"); with this d (3,019) its run NSR is 0.13, where the
    head-only suffix's 0.08 gave 0.966. For LoRA (lr_scale 1) and the head-only suffix, d is the parameter count.
    """
    adapters = {id(p) for p in getattr(model, "adapter_params", ())}
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for p in trainable if id(p) not in adapters)
    adapted = sum(p.numel() for p in trainable if id(p) in adapters)
    top = max(1.0, lr_scale)
    return max(1, round(head / top ** 2 + adapted * (lr_scale / top) ** 2))


def run_params(model, cfg) -> int:
    """d of a run (``cfg``: a :class:`~fedtl.config.FedTLConfig`): :func:`effective_params`, plus the head once more
    with ``personalization.kind = local-head``. The local head is clipped with the update in one per-example norm
    (:class:`fedtl.training.WithLocalHead`), so the update's share of the clipping norm shrinks: while both heads'
    gradients are alike (the first round of a head-only suffix, where they are equal) by 1/√2, the NSR factor that
    counting the head twice gives."""
    d = effective_params(model, cfg.adapters.effective_lr_scale())
    if cfg.personalization.kind == "local-head":
        top = max(1.0, cfg.adapters.effective_lr_scale())
        d += round(sum(p.numel() for p in model.suffix.head.parameters() if p.requires_grad) / top ** 2)
    return d


def nsr(sigma: float, params: int, batch: float, steps: int) -> float:
    return sigma * math.sqrt(params) / (max(batch, 1e-9) * math.sqrt(max(steps, 1))) if math.isfinite(sigma) else math.inf


def plan_site(site: str, n: int, *, rounds: int, batch_size: int, epochs: int, params: int, budget: Budget,
              advise: bool = True, personalize_epochs: int = 0) -> SitePlan:
    from fedtl.privacy.accounting import epsilon_of

    batch = max(1, min(batch_size, n))
    per_epoch = steps_per_epoch(n, batch)
    q, k = 1.0 / per_epoch, per_epoch * epochs
    extra = per_epoch * max(0, personalize_epochs)
    sigma = _sigma(budget, q, k, rounds, extra)
    expected_batch = q * n
    if math.isfinite(sigma):
        per_round = epsilon_of([(sigma, q, k)], budget.delta, budget.accountant)
        total = epsilon_of([(sigma, q, k * rounds + extra)], budget.delta, budget.accountant)
    else:
        per_round = total = math.inf
    ratio = nsr(sigma, params, expected_batch, k)
    if not math.isfinite(sigma) or sigma > budget.max_noise_multiplier:
        verdict = "declines"
    else:
        verdict = "noise" if ratio >= NOISE else "noisy" if ratio >= NOISY else "ok"
    plan = SitePlan(site, n, batch, q, k, rounds, sigma, per_round, total, ratio, verdict, personalize_steps=extra,
                    epsilon_room=min(budget.target_epsilon, budget.run_cap))
    if advise and verdict != "ok":
        plan.advice = _advice(plan, epochs=epochs, params=params, budget=budget, personalize_epochs=personalize_epochs)
    return plan


def _advice(plan: SitePlan, *, epochs: int, params: int, budget: Budget, personalize_epochs: int = 0) -> list[str]:
    """What would bring the update above the noise: each alternative measured by the same formulas, the
    schedules (rounds, full batches) ranked by run NSR, lowest first (the best first)."""
    def alt(**kw) -> SitePlan:
        args = {"rounds": plan.rounds, "batch_size": plan.batch, "epochs": epochs, "params": params, "budget": budget,
                "personalize_epochs": personalize_epochs}
        return plan_site(plan.site, plan.n, **{**args, **kw}, advise=False)

    schedules = []
    for rounds in sorted({max(1, plan.rounds // 4), max(1, plan.rounds // 2), plan.rounds * 2} - {plan.rounds}):
        if rounds <= 1000:
            schedules.append((f"{rounds} round{'s' if rounds > 1 else ''}", alt(rounds=rounds)))
    if plan.batch < plan.n:
        schedules.append((f"full batches (train.batch-size ≥ {plan.n})", alt(batch_size=plan.n)))
    now = f"now: run NSR {plan.run_nsr:.2f}, ε spent {plan.epsilon_total:.2f}"
    out = [f"{name}: σ={a.sigma:.2f}, NSR {a.nsr:.2f} per round, run NSR {a.run_nsr:.2f}, ε spent "
           f"{a.epsilon_total:.2f}" + (" (better)" if a.run_nsr < plan.run_nsr * 0.95 else "")
           for name, a in sorted(schedules, key=lambda x: x[1].run_nsr)]
    out.append(f"({now}; fewer rounds lower the noise of each round but not of the run)")
    bigger = Budget(budget.target_epsilon * 2, budget.delta, budget.round_cap * 2, budget.run_cap * 2,
                    budget.max_noise_multiplier, budget.accountant)
    out.append(f"twice the budget (ε={bigger.target_epsilon:g}): run NSR {alt(budget=bigger).run_nsr:.2f}")
    out.append(f"fewer trainable parameters (now d = {params}): NSR scales with √d")
    out.append("pooling this site's images with another site's doubles B and halves NSR")
    if personalize_epochs:
        out.append(f"no personalization (personalization.kind = none): run NSR "
                   f"{alt(personalize_epochs=0).run_nsr:.2f} (the {plan.personalize_steps} fine-tuning steps "
                   "reserved now cost every round noise)")
    return out


def plan_own_site(policy, ledger, n: int, *, rounds: int, batch_size: int, epochs: int = 1,
                  params: int | None = None) -> tuple[SitePlan, list[str]]:
    """A deployed site's plan from its own policy and ledger (``fedtl site check``), and the site's notes.

    σ is what the site itself will calibrate at the first round of a new run of this schedule
    (:func:`fedtl.privacy.policy.plan_round`: its budget, caps and the history in its ledger); "ε total" is what
    that run adds to the ledger. ``params`` (d) gives the NSR; None: unknown (NSR and verdict not given unless
    the site declines). Reads the ledger, never writes it.
    """
    from fedtl.privacy.accounting import epsilon_of
    from fedtl.privacy.policy import Decline, Proposal, plan_round

    planned = max(1, min(int(rounds), policy.max_rounds_per_run))
    decided = plan_round(policy, ledger, Proposal(planned, batch_size, epochs), run_id="fedtl-site-check",
                         server_round=1, num_examples=n)
    spent = ledger.epsilon()
    room = max(0.0, min(policy.target_epsilon - spent, policy.run_cap))
    batch = max(1, min(batch_size, max(n, 1)))
    per_epoch = steps_per_epoch(max(n, 1), batch)
    q = 1.0 / per_epoch
    if isinstance(decided, Decline):
        k = per_epoch * epochs
        plan = SitePlan(policy.site, n, batch, q, k, planned, math.inf, math.inf, math.inf, math.inf, "declines",
                        epsilon_room=room)
        notes = [decided.reason]
    else:
        sigma, k = decided.noise_multiplier, decided.steps
        per_round = epsilon_of([(sigma, q, k)], policy.delta, policy.accountant)
        total = ledger.epsilon([(sigma, q, k * planned)]) - spent
        ratio = nsr(sigma, params, q * n, k) if params else math.nan
        verdict = "" if not params else "noise" if ratio >= NOISE else "noisy" if ratio >= NOISY else "ok"
        plan = SitePlan(policy.site, n, decided.batch_size, q, k, planned, sigma, per_round, total, ratio, verdict,
                        epsilon_room=room)
        notes = list(decided.notes)
    if params and plan.verdict in ("noise", "declines") and room > 0:
        budget = Budget(room, policy.delta, policy.round_cap, room, policy.max_noise_multiplier, policy.accountant)
        plan.advice = _advice(plan, epochs=epochs, params=params, budget=budget)
    return plan, notes


def format_own_plan(plan: SitePlan, notes: list[str], params: int | None, spent: float) -> list[str]:
    """``fedtl site check``'s lines for :func:`plan_own_site`."""
    if plan.verdict == "declines":
        lines = [f"  the site would decline: {notes[0] if notes else 'no σ within its policy fits the run'}"]
    else:
        lines = [f"  σ = {plan.sigma:.2f}, ε {plan.epsilon_per_round:.3f} per round, {plan.epsilon_total:.2f} over the run "
                 f"(after it: {spent + plan.epsilon_total:.2f} spent)"]
        if params:
            lines.append(f"  noise-to-signal of its update (d = {params}): NSR {plan.nsr:.2f} per round, "
                         f"{plan.run_nsr:.2f} over the run: {plan.verdict}")
        else:
            lines.append("  NSR: unknown until the backbone's weights are at this site (the server sends them at the "
                         "first run; `fedtl plan --site-sizes N` on a machine with them)")
        lines.extend(f"  note: {note}" for note in notes)
    if plan.verdict == "noise":
        lines.append("! this site's updates would be mostly noise on their own (the server averages them with other "
                     "sites'). What would help:")
    elif plan.verdict == "declines" and plan.advice:
        lines.append("! What would help:")
    lines.extend(f"    - {a}" for a in plan.advice)
    return lines


def plan_simulation(cfg) -> tuple[list[SitePlan], int, int]:
    """Plans of the simulated sites of ``cfg`` (their partition sizes and budgets), d (:func:`effective_params`)
    and the number of trainable parameters."""
    from fedtl.federation.site import build_transfer_model, load_source, site_indices

    source = load_source(cfg.data.path)
    model = build_transfer_model(cfg.simulated(), source.num_classes)
    params = run_params(model, cfg)
    sizes = [len(site_indices(cfg, s, cfg.federation.sites)) for s in range(cfg.federation.sites)]
    return plan_sizes(cfg, sizes, params), params, model.param_counts()["trainable_params"]


def plan_sizes(cfg, sizes: list[int], params: int, advise: bool = True) -> list[SitePlan]:
    p = cfg.privacy
    budgets = p.site_budgets() if p.site_epsilons else ()
    plans = []
    for i, n in enumerate(sizes):
        eps = budgets[i] if i < len(budgets) else p.target_epsilon
        budget = Budget(eps, p.delta, p.max_epsilon_per_round or eps / 4, p.max_epsilon_per_run or eps,
                        p.max_noise_multiplier, p.accountant)
        reserved = cfg.personalization.requested_epochs if p.personalize_dp else 0  # no-noise fine-tuning: none
        plans.append(plan_site(f"site-{i}", n, rounds=min(cfg.federation.rounds, p.max_rounds_per_run),
                               batch_size=cfg.train.batch_size, epochs=cfg.train.epochs, params=params, budget=budget,
                               advise=advise, personalize_epochs=reserved))
    return plans


def federation_nsr(plans: list[SitePlan], fed: FederationConfig | None = None) -> float:
    """NSR of one round's aggregate: the sites' updates averaged with the server's weights (``fed``'s
    ``weighting`` and ``weight_cap``, default the defaults: :meth:`FederationConfig.aggregation_weights`);
    independent noise adds in quadrature, signal linearly: √(Σ w²·NSR²) / Σ w."""
    live = [p for p in plans if p.verdict != "declines"]
    if not live:
        return math.inf
    w = (fed or FederationConfig()).aggregation_weights([float(p.n) for p in live])
    return math.sqrt(sum((wi * p.nsr) ** 2 for wi, p in zip(w, live))) / sum(w)


def federation_run_nsr(plans: list[SitePlan], fed: FederationConfig | None = None) -> float:
    """Run NSR of the aggregate: :func:`federation_nsr` over √rounds (the rounds' noise adds in quadrature)."""
    rounds = max((p.rounds for p in plans), default=1)
    return federation_nsr(plans, fed) / math.sqrt(max(rounds, 1))


def _federation_verdict(plans: list[SitePlan], fed: FederationConfig | None) -> str:
    """'' when the federation learns; else one sentence on what to expect (run NSR of the aggregate)."""
    run = federation_run_nsr(plans, fed)
    if run >= RUN_NOISE:
        return (f"The federation's aggregate over the run is mostly noise (run NSR {run:.2f}): expect a model near "
                "chance. Fewer trainable parameters, larger budgets, or pooled sites would help.")
    if run >= RUN_NOISY:
        return (f"The federation's aggregate over the run is noisy (run NSR {run:.2f}): expect a clearly weaker model "
                "than a larger budget would give (measured: 0.939 test AUC at run NSR 0.43 against 0.966 at 0.08).")
    return ""


def _unspent_warning(plans: list[SitePlan]) -> str:
    """'' unless the per-round cap keeps sites from spending what the run may take (e.g. 10 rounds at ε/4 a round)."""
    unspent = [p for p in plans if p.verdict != "declines" and p.leaves_unspent]
    if not unspent:
        return ""
    low, high = min(p.epsilon_total for p in unspent), max(p.epsilon_total for p in unspent)
    spend = f"ε≈{low:.2f}" if high - low < 0.005 else f"ε≈{low:.2f}–{high:.2f}"
    return (f"{len(unspent)} of {len(plans)} sites will spend only {spend} of the {unspent[0].epsilon_room:g} this run "
            f"may take: the per-round cap (privacy.max-epsilon-per-round, default a quarter of the budget) sets their "
            f"noise for {unspent[0].rounds} rounds. More rounds, or a higher per-round cap, would train with less noise.")


def params_reason(cfg) -> str:
    """Why d (:func:`run_params`) differs from the trainable parameter count under ``cfg``, for ``fedtl plan``."""
    why = []
    if cfg.adapters.kind != "none" and cfg.adapters.effective_lr_scale() != 1:
        why.append("the adapted or unfrozen weights learn at a lower lr; their noise counts by lr²")
    if cfg.personalization.kind == "local-head":
        why.append("each site's local head shares every example's clipping norm with the update: the head counts twice")
    return "; ".join(why)


def format_plans(plans: list[SitePlan], params: int, fed: FederationConfig | None = None,
                 trainable: int = 0, why: str = "") -> list[str]:
    """``fedtl plan``'s table and verdicts; ``params``: d of the NSR, ``trainable``: the parameter count when it
    differs (:func:`run_params`), ``why``: why it differs (:func:`params_reason`)."""
    lines = [f"{'site':<10}{'n':>6}{'batch':>6}{'steps/rd':>9}{'rounds':>7}{'σ':>7}{'ε/round':>9}{'ε total':>8}"
             f"{'NSR':>7}{'run NSR':>9}  verdict"]
    for p in plans:
        sigma = f"{p.sigma:.2f}" if math.isfinite(p.sigma) else ">100"
        lines.append(f"{p.site:<10}{p.n:>6}{p.batch:>6}{p.steps_per_round:>9}{p.rounds:>7}{sigma:>7}"
                     f"{p.epsilon_per_round:>9.3f}{p.epsilon_total:>8.3f}{p.nsr:>7.2f}{p.run_nsr:>9.2f}  {p.verdict}")
    weights = "one weight per site" if (fed or FederationConfig()).weighting == "sites" else \
        "weights as the server: examples, capped"
    fed_nsr = federation_nsr(plans, fed)
    rounds = max((p.rounds for p in plans), default=1)
    counted = (f"trainable parameters {trainable:,}, d = {params:,} for the NSR" + (f" ({why})" if why else "")
               if trainable and trainable != params else f"trainable parameters d = {params}")
    lines.append(f"{counted}; federation NSR of a round's aggregate "
                 f"({sum(p.verdict != 'declines' for p in plans)} sites, "
                 f"{weights}) = {fed_nsr:.2f}, "
                 f"of the run's {rounds} rounds = {fed_nsr / math.sqrt(max(rounds, 1)):.2f}")
    if any(p.personalize_steps for p in plans):
        lines.append("σ and ε total include each site's fine-tuning after the last round (personalization.kind = "
                     "finetune), reserved from round 1: "
                     + ", ".join(f"{p.site} {p.personalize_steps} steps" for p in plans[:6])
                     + (" …" if len(plans) > 6 else ""))
    bad = [p for p in plans if p.verdict in ("noise", "declines")]
    for p in bad[:5]:
        what = "will decline every round" if p.verdict == "declines" else "will send updates that are mostly noise"
        lines.append(f"! {p.site} ({p.n} images) {what}. What would help:")
        lines.extend(f"    - {a}" for a in p.advice)
    if len(bad) > 5:
        lines.append(f"! … and {len(bad) - 5} more such sites")
    unspent = _unspent_warning(plans)
    if unspent:
        lines.append(f"! {unspent}")
    verdict = _federation_verdict(plans, fed)
    if verdict:
        lines.append(f"! {verdict}")
    elif bad:
        lines.append(f"Averaged over the sites and the run's {rounds} rounds the noise is small against the signal "
                     f"(run NSR of the aggregate {fed_nsr / math.sqrt(max(rounds, 1)):.2f}): the federation learns.")
    return lines


def warnings_for(plans: list[SitePlan], fed: FederationConfig | None = None) -> list[str]:
    """The plan's warnings in a few lines (the check at the start of a simulation)."""
    out = []
    declining = [p for p in plans if p.verdict == "declines"]
    if declining:
        names = ", ".join(f"{p.site} ({p.n} images)" for p in declining[:6]) + (" …" if len(declining) > 6 else "")
        out.append(f"{len(declining)} of {len(plans)} sites will decline every round (no σ within their policy fits "
                   f"the run): {names}. `fedtl plan` shows what would help.")
    unspent = _unspent_warning(plans)
    if unspent:
        out.append(unspent)
    verdict = _federation_verdict(plans, fed)
    if verdict:
        noisy = [p for p in plans if p.verdict == "noise"]
        names = ", ".join(f"{p.site} ({p.n} images, NSR {p.nsr:.1f})" for p in noisy[:6]) + (" …" if len(noisy) > 6 else "")
        out.append(verdict + (f" Sites whose own updates are mostly noise: {names}." if noisy else "")
                   + " `fedtl plan` shows what would help.")
    return out
