"""A site's privacy policy, and how a round's DP parameters are chosen under it.

The policy is the only authority over a site's privacy. A deployed site builds it from its own
``site.toml`` (:meth:`PrivacyPolicy.from_site`); a simulation builds one per simulated site
from the run's config (:meth:`PrivacyPolicy.for_simulation` — one trust domain) and goes
through the same code. What the server asks for is a :class:`Proposal` — rounds, a noise
multiplier, batch size, local epochs — and :func:`plan_round` clamps it to the policy:

* the noise multiplier is the *largest* of: the server's proposal, and the smallest σ that keeps
  (a) the site's lifetime budget, (b) its per-run cap and (c) its per-round cap for the rounds
  it still plans to serve this run; a server cannot lower it;
* the rounds planned are at most ``max_rounds_per_run``; a site stops serving a run after that;
* a round that would need σ above ``max_noise_multiplier`` is declined: its update would be
  noise, and it would still spend budget;
* a round that would exceed any cap is declined, with a reason that names no local path;
* local fine-tuning after the last round (``Proposal.personalize_epochs``, capped by the policy's
  ``max_personalize_epochs``) is part of the plan from the first round: σ is calibrated so that the
  planned rounds *and* the fine-tuning steps fit every cap; :func:`plan_personalize` then spends
  what remains on them (or declines, and the site keeps the global suffix). A site whose policy says
  ``personalize_dp = False`` fine-tunes without noise: nothing is reserved or spent, and the suffix it
  trains never leaves it (:func:`personalizes_privately`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fedtl.errors import ConfigError, PrivacyBudgetError
from fedtl.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon_of

log = logging.getLogger(__name__)

# Measured (docs/privacy.md, "max-noise-multiplier"): σ on every site degrades the model past σ ≈ 8, but small
# sites joining at σ up to 26 (their weight is their example count, capped at the median) lifted ε = 1 from
# 0.953 ± 0.009 to 0.960 ± 0.003; at a cap of 10 they declined every round. 50 admits every site size at ε ≥ 0.5
# over 40 rounds (a full batch needs σ = 48.75 there).
DEFAULT_MAX_NOISE_MULTIPLIER = 50.0
DEFAULT_MAX_ROUNDS_PER_RUN = 200
DEFAULT_ROUND_FRACTION = 0.25  # default per-round cap: a quarter of the site's budget
MAX_EPOCHS_PER_ROUND = 20
DEFAULT_MAX_PERSONALIZE_EPOCHS = 5
_EPS_TOL = 1e-9


def _finite(name: str, value: float, *, low: float | None = None, high: float | None = None,
            low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        raise ConfigError(f"`privacy.{name}` must be a finite number {' and '.join(bounds)}, got {value!r}.")


@dataclass(frozen=True)
class PrivacyPolicy:
    """What one site may spend, and how. Built from ``site.toml`` (deployed) or the simulation's config."""

    site: str
    ledger_path: Path
    target_epsilon: float  # lifetime budget of the site
    delta: float
    accountant: str = "rdp"
    max_grad_norm: float = 1.0
    max_epsilon_per_run: float = 0.0  # 0: the whole budget
    max_epsilon_per_round: float = 0.0  # 0: DEFAULT_ROUND_FRACTION of the budget
    max_rounds_per_run: int = DEFAULT_MAX_ROUNDS_PER_RUN
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER
    max_personalize_epochs: int = DEFAULT_MAX_PERSONALIZE_EPOCHS  # 0: never personalizes (no fine-tuning, no local head)
    personalize_dp: bool = True  # False: the local fine-tuning trains without noise and spends (and reserves) no ε;
    #                              its suffix never leaves the site (joint DP: what leaves is still DP)
    dp: bool = True  # False only in a simulation run with --no-dp
    seeded: bool = False  # reproducible noise: simulation only
    seed: int = 0
    deployed: bool = False

    def __post_init__(self) -> None:
        _finite("target-epsilon", self.target_epsilon, low=0)
        _finite("delta", self.delta, low=0, high=0.1)
        _finite("max-grad-norm", self.max_grad_norm, low=0, high=1e6)
        _finite("max-epsilon-per-run", self.max_epsilon_per_run, low=0, low_open=False)
        _finite("max-epsilon-per-round", self.max_epsilon_per_round, low=0, low_open=False)
        _finite("max-noise-multiplier", self.max_noise_multiplier, low=0, high=1e4)
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"`privacy.accountant` must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}.")
        if isinstance(self.max_rounds_per_run, bool) or not isinstance(self.max_rounds_per_run, int) or self.max_rounds_per_run < 1:
            raise ConfigError(f"`privacy.max-rounds-per-run` must be an integer >= 1, got {self.max_rounds_per_run!r}.")
        m = self.max_personalize_epochs
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_EPOCHS_PER_ROUND:
            raise ConfigError(f"`privacy.max-personalize-epochs` must be an integer in [0, {MAX_EPOCHS_PER_ROUND}] "
                              f"(0: never fine-tune locally), got {m!r}.")
        if not isinstance(self.personalize_dp, bool):
            raise ConfigError(f"`privacy.personalize-dp` must be true or false, got {self.personalize_dp!r}.")
        if self.deployed and not self.dp:
            raise ConfigError(f"Site `{self.site}`: a deployed site always trains with differential privacy.")
        if self.deployed and self.seeded:
            raise ConfigError(f"Site `{self.site}`: a deployed site never uses seeded (predictable) noise.")

    @property
    def run_cap(self) -> float:
        return min(self.max_epsilon_per_run or self.target_epsilon, self.target_epsilon)

    @property
    def round_cap(self) -> float:
        return min(self.max_epsilon_per_round or DEFAULT_ROUND_FRACTION * self.target_epsilon, self.run_cap)

    def describe(self) -> dict:
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "accountant": self.accountant,
                "max_grad_norm": self.max_grad_norm, "max_epsilon_per_run": self.run_cap,
                "max_epsilon_per_round": self.round_cap, "max_rounds_per_run": self.max_rounds_per_run,
                "max_noise_multiplier": self.max_noise_multiplier, "max_personalize_epochs": self.max_personalize_epochs,
                "personalize_dp": self.personalize_dp,
                "randomness": "seeded" if self.seeded else "os"}


@dataclass(frozen=True)
class Proposal:
    """What the server asks of a round (untrusted; clamped by :func:`plan_round`)."""

    total_rounds: int
    batch_size: int
    epochs: int = 1
    noise_multiplier: float = 0.0  # 0: none proposed
    personalize_epochs: int = 0  # local fine-tuning after the last round, reserved in the plan (0: none)


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    batch_size: int
    epochs: int
    steps: int
    epsilon_before: float
    epsilon_after: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decline:
    reason: str  # sent to the server: no local paths
    epsilon: float  # the site's cumulative ε (unchanged)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one epoch; with Poisson sampling the sample rate is 1 / this."""
    return max(1, math.ceil(n / max(1, min(batch_size, n))))


def personalize_epochs(policy: PrivacyPolicy, requested: int) -> int:
    """The fine-tuning epochs the site grants: the request clamped to its policy (0: none)."""
    return max(0, min(int(requested), policy.max_personalize_epochs))


def personalizes_privately(policy: PrivacyPolicy) -> bool:
    """Whether the site's local fine-tuning is DP-SGD planned in its ledger (False: no noise, no ε, nothing
    reserved — ``personalize-dp = false``, or a simulation with --no-dp)."""
    return policy.dp and policy.personalize_dp


def plan_round(policy: PrivacyPolicy, ledger, proposal: Proposal, *, run_id: str, server_round: int,
               num_examples: int) -> RoundPlan | Decline:
    """The DP parameters of this round under ``policy``, or the reason the site declines it.

    ``ledger`` is the site's :class:`~fedtl.privacy.ledger.PrivacyLedger`, opened under its lock.
    Its ``plan`` caches the calibration of the current run (reused while nothing changed).
    """
    name = policy.site
    spent = ledger.epsilon()
    n = int(num_examples)
    if n <= 0:
        return Decline(f"Site `{name}` has no training examples.", spent)
    served = ledger.rounds_in_run(run_id)
    if int(server_round) in served:
        return Decline(f"Site `{name}` already trained round {server_round} of this run; it will not spend privacy "
                       "on the same round twice.", spent)
    if len(served) >= policy.max_rounds_per_run:
        return Decline(f"Site `{name}` has served {len(served)} rounds of this run, the most its policy allows "
                       f"(max-rounds-per-run = {policy.max_rounds_per_run}).", spent)
    notes = []
    batch = max(1, min(int(proposal.batch_size), n))
    epochs = max(1, min(int(proposal.epochs), MAX_EPOCHS_PER_ROUND))
    if epochs != proposal.epochs:
        notes.append(f"local epochs clamped from {proposal.epochs} to {epochs}")
    planned = max(1, min(int(proposal.total_rounds), policy.max_rounds_per_run))
    if planned != proposal.total_rounds:
        notes.append(f"planned rounds clamped from {proposal.total_rounds} to {planned} (max-rounds-per-run)")
    per_epoch = steps_per_epoch(n, batch)
    q, round_steps = 1.0 / per_epoch, per_epoch * epochs
    remaining = max(1, planned - len(served))
    ft_epochs = personalize_epochs(policy, proposal.personalize_epochs)
    if ft_epochs != proposal.personalize_epochs:
        notes.append(f"fine-tuning epochs clamped from {proposal.personalize_epochs} to {ft_epochs} "
                     "(max-personalize-epochs)")
    # reserved now, spent after the last round (plan_personalize); a fine-tuning without DP spends nothing
    ft_steps = per_epoch * ft_epochs if personalizes_privately(policy) else 0

    key = {"run": str(run_id), "sample_rate": q, "round_steps": round_steps, "planned_rounds": planned,
           "target_epsilon": policy.target_epsilon, "run_cap": policy.run_cap, "round_cap": policy.round_cap,
           "personalize_steps": ft_steps}
    cached = ledger.plan if {k: ledger.plan.get(k) for k in key} == key else None
    if cached is not None:
        sigma = float(cached["noise_multiplier"])
    else:
        sigma = _calibrate(policy, ledger, run_id, q, round_steps, remaining, extra_steps=ft_steps)
        if math.isfinite(sigma):
            ledger.plan = {**key, "noise_multiplier": sigma}
            note = _unspent_note(policy, ledger, run_id, sigma, q, round_steps * remaining + ft_steps, remaining)
            if note:
                notes.append(note)
    if proposal.noise_multiplier > sigma:
        sigma = float(proposal.noise_multiplier)  # more noise than needed: the site accepts
    elif 0 < proposal.noise_multiplier < sigma:
        notes.append(f"proposed noise multiplier {proposal.noise_multiplier:g} raised to {sigma:.3f} (the site's budget)")
    if spent >= policy.target_epsilon - 1e-6:
        return Decline(f"Site `{name}` has spent ε={spent:.2f} of its budget {policy.target_epsilon:g}; it will not "
                       "train another round.", spent)
    if not math.isfinite(sigma) or sigma > policy.max_noise_multiplier:
        needed = f"σ={sigma:.1f}" if math.isfinite(sigma) else f"σ>{policy.max_noise_multiplier:g}"
        return Decline(
            f"Site `{name}` would need noise multiplier {needed} to stay within its policy (spent ε={spent:.2f} of "
            f"{policy.target_epsilon:g}, at most {policy.round_cap:g} per round), above its policy's max-noise-multiplier "
            f"{policy.max_noise_multiplier:g}: the update would be noise, so it will not train this round. Fewer "
            "rounds, larger batches or a larger budget would let it.", spent)
    step = [(sigma, q, round_steps)]
    after = ledger.epsilon(step)
    run_after = epsilon_of(ledger.run_history(run_id) + step, policy.delta, policy.accountant)
    this_round = epsilon_of(step, policy.delta, policy.accountant)
    if after > policy.target_epsilon + _EPS_TOL:
        return Decline(f"Site `{name}` has spent ε={spent:.2f} of its budget {policy.target_epsilon:g}; this round "
                       f"would bring it to ε={after:.2f}, so it will not train another round.", spent)
    if run_after > policy.run_cap + _EPS_TOL:
        return Decline(f"Site `{name}` would spend ε={run_after:.2f} in this run, above its per-run cap "
                       f"{policy.run_cap:g}; it will not train another round of this run.", spent)
    if this_round > policy.round_cap + _EPS_TOL:
        return Decline(f"Site `{name}` would spend ε={this_round:.2f} in this round, above its per-round cap "
                       f"{policy.round_cap:g}.", spent)
    return RoundPlan(sigma, q, batch, epochs, round_steps, spent, after, tuple(notes))


def _calibrate(policy: PrivacyPolicy, ledger, run_id: str, q: float, round_steps: int, remaining: int,
               extra_steps: int = 0, extra_is_round: bool = False) -> float:
    """Smallest σ meeting every cap for the ``remaining`` rounds (plus ``extra_steps`` of fine-tuning after
    them, at the same σ and sample rate); ``inf`` when none does.

    The fine-tuning is held to the per-round cap only when it is planned on its own (``extra_is_round``,
    :func:`plan_personalize`): while the rounds reserve it, it only counts against the lifetime and per-run
    caps, so a longer fine-tuning does not add noise to every round; if the per-round cap then needs more
    noise for it, the site spends less than it reserved (never more).

    One bound check first: if even the policy's ``max_noise_multiplier`` breaks a cap, the round will be
    declined whatever σ a search would find, so none is run (one accountant curve, at that σ). Otherwise
    each cap's σ is searched below it.
    """
    acc, delta = policy.accountant, policy.delta
    bound = policy.max_noise_multiplier
    total = remaining * round_steps + extra_steps
    checks = [(policy.target_epsilon, total, ledger.history)]
    if round_steps:
        checks.append((policy.round_cap, round_steps, []))
    if extra_steps and extra_is_round:
        checks.append((policy.round_cap, extra_steps, []))  # the fine-tuning, when spent, counts as one round
    if policy.run_cap < policy.target_epsilon:
        checks.append((policy.run_cap, total, ledger.run_history(run_id)))
    if any(epsilon_of(prior + [(bound, q, steps)], delta, acc) > cap for cap, steps, prior in checks):
        return math.inf
    try:
        return max(calibrate_noise(cap, delta, q, steps, prior=prior, accountant=acc, max_sigma=bound)
                   for cap, steps, prior in checks)
    except PrivacyBudgetError:
        return math.inf


UNSPENT_FRACTION = 0.9  # a plan that leaves more than 10 % of what the run may spend says why


def _unspent_note(policy: PrivacyPolicy, ledger, run_id: str, sigma: float, q: float, steps: int, rounds: int) -> str:
    """A note when the per-round cap, not the budget, sets σ, so that the planned rounds leave part of what this run
    may spend unused (e.g. 10 rounds at the default cap of a quarter of the budget spend about 2.3 of ε = 3)."""
    planned = [(sigma, q, steps)]
    total = ledger.epsilon(planned)
    run_total = epsilon_of(ledger.run_history(run_id) + planned, policy.delta, policy.accountant)
    spent, run_spent = ledger.epsilon(), epsilon_of(ledger.run_history(run_id), policy.delta, policy.accountant)
    room = min(policy.target_epsilon - spent, policy.run_cap - run_spent)  # what this run may still take
    used = min(total - spent, run_total - run_spent)
    if room <= 0 or used >= UNSPENT_FRACTION * room:
        return ""
    return (f"the per-round cap (ε={policy.round_cap:g}) sets σ={sigma:.3f}: the {rounds} planned round(s) will spend "
            f"about ε={used:.2f} of the {room:.2f} this run may take; more rounds, or a higher max-epsilon-per-round, "
            "would train with less noise")


def plan_personalize(policy: PrivacyPolicy, ledger, *, run_id: str, requested_epochs: int, batch_size: int,
                     num_examples: int) -> RoundPlan | Decline:
    """DP parameters of the local fine-tuning after the last round, from what the site has left, or why not.

    The rounds' σ was calibrated with these steps reserved (:func:`plan_round`), so a site that trained
    every planned round can afford them; σ here is the smallest that keeps every cap with the ledger as it
    is now. Declined when the policy refuses fine-tuning, it was already done in this run, or it would
    need more noise than ``max_noise_multiplier``.
    """
    name, spent, n = policy.site, ledger.epsilon(), int(num_examples)
    epochs = personalize_epochs(policy, requested_epochs)
    if n <= 0:
        return Decline(f"Site `{name}` has no training examples to fine-tune on.", spent)
    if epochs <= 0:
        return Decline(f"Site `{name}` does not fine-tune locally (its policy's max-personalize-epochs is "
                       f"{policy.max_personalize_epochs}); it keeps the global suffix.", spent)
    if ledger.personalized(run_id):
        return Decline(f"Site `{name}` already fine-tuned in this run; it will not spend privacy on it twice.", spent)
    notes = (f"fine-tuning epochs clamped from {requested_epochs} to {epochs} (max-personalize-epochs)",) \
        if epochs != requested_epochs else ()
    batch = max(1, min(int(batch_size), n))
    per_epoch = steps_per_epoch(n, batch)
    q, steps = 1.0 / per_epoch, per_epoch * epochs
    if not personalizes_privately(policy):  # no noise, nothing spent: ε stays where the ledger has it
        return RoundPlan(0.0, q, batch, epochs, steps, spent, spent, notes)
    sigma = _calibrate(policy, ledger, run_id, q, 0, 0, extra_steps=steps, extra_is_round=True)
    if not math.isfinite(sigma) or sigma > policy.max_noise_multiplier:
        return Decline(f"Site `{name}` cannot afford {epochs} epoch(s) of local fine-tuning (spent ε={spent:.2f} of "
                       f"{policy.target_epsilon:g}; it would need more noise than its max-noise-multiplier "
                       f"{policy.max_noise_multiplier:g}); it keeps the global suffix.", spent)
    after = ledger.epsilon([(sigma, q, steps)])
    if after > policy.target_epsilon + _EPS_TOL:  # never: _calibrate kept it; checked again, as in plan_round
        return Decline(f"Site `{name}` would reach ε={after:.2f} of {policy.target_epsilon:g} by fine-tuning; it "
                       "keeps the global suffix.", spent)
    return RoundPlan(sigma, q, batch, epochs, steps, spent, after, notes)


def policy_for_site(site_config) -> PrivacyPolicy:
    """A deployed site's policy, from its ``site.toml`` alone (:class:`fedtl.site_config.SiteConfig`)."""
    p = site_config.privacy
    return PrivacyPolicy(
        site=site_config.name, ledger_path=Path(site_config.state_dir) / "privacy-ledger.json",
        target_epsilon=p.target_epsilon, delta=p.delta, accountant=p.accountant, max_grad_norm=p.max_grad_norm,
        max_epsilon_per_run=p.max_epsilon_per_run, max_epsilon_per_round=p.max_epsilon_per_round,
        max_rounds_per_run=p.max_rounds_per_run, max_noise_multiplier=p.max_noise_multiplier,
        max_personalize_epochs=p.max_personalize_epochs, personalize_dp=p.personalize_dp, deployed=True)


def policy_for_simulation(privacy, site: str, site_index: int, ledger_path: Path, seed: int = 0) -> PrivacyPolicy:
    """A simulated site's policy, from the simulation's :class:`fedtl.config.PrivacyConfig` (one trust domain)."""
    return PrivacyPolicy(
        site=site, ledger_path=ledger_path, target_epsilon=privacy.budget_for(site_index), delta=privacy.delta,
        accountant=privacy.accountant, max_grad_norm=privacy.max_grad_norm,
        max_epsilon_per_run=privacy.max_epsilon_per_run, max_epsilon_per_round=privacy.max_epsilon_per_round,
        max_rounds_per_run=privacy.max_rounds_per_run, max_noise_multiplier=privacy.max_noise_multiplier,
        max_personalize_epochs=MAX_EPOCHS_PER_ROUND,  # one trust domain: the run's personalization.epochs decides
        personalize_dp=privacy.personalize_dp,
        dp=privacy.enabled, seeded=privacy.randomness == "seeded", seed=seed)
