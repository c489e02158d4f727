"""The site's policy clamps what a server proposes; every cap holds."""

import math

import pytest

from fedtl.config import PrivacyConfig
from fedtl.errors import ConfigError, PrivacyBudgetError
from fedtl.privacy import PrivacyPolicy, Proposal, epsilon_of, open_ledger, plan_round
from fedtl.privacy.policy import Decline, RoundPlan, policy_for_simulation


def _policy(tmp_path, **kw):
    base = dict(site="st-mary", ledger_path=tmp_path / "privacy-ledger.json", target_epsilon=3.0, delta=1e-5)
    return PrivacyPolicy(**{**base, **kw})


def _plan(policy, proposal, rnd=1, n=400, run="run-1", record=True):
    with open_ledger(policy.ledger_path, site=policy.site, delta=policy.delta, accountant=policy.accountant) as ledger:
        plan = plan_round(policy, ledger, proposal, run_id=run, server_round=rnd, num_examples=n)
        if record and isinstance(plan, RoundPlan):
            ledger.append(run=run, round=rnd, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                          steps=plan.steps)
            ledger.save()
        return plan


def test_a_lower_proposed_noise_is_raised_a_higher_one_kept(tmp_path):
    policy = _policy(tmp_path)
    own = _plan(policy, Proposal(total_rounds=20, batch_size=64), record=False)
    low = _plan(policy, Proposal(total_rounds=20, batch_size=64, noise_multiplier=0.01), record=False)
    high = _plan(policy, Proposal(total_rounds=20, batch_size=64, noise_multiplier=own.noise_multiplier * 2), record=False)
    assert low.noise_multiplier == own.noise_multiplier and any("raised" in n for n in low.notes)
    assert high.noise_multiplier == own.noise_multiplier * 2


def test_whole_budget_in_round_one_is_capped_per_round(tmp_path):
    policy = _policy(tmp_path)  # per-round cap: a quarter of the budget
    plan = _plan(policy, Proposal(total_rounds=1, batch_size=400))
    assert isinstance(plan, RoundPlan)
    assert epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps)], 1e-5) <= 0.75 + 1e-9
    assert plan.epsilon_after <= 0.75 + 1e-9


def test_rounds_are_clamped_and_a_run_is_served_at_most_max_rounds(tmp_path):
    policy = _policy(tmp_path, max_rounds_per_run=3, max_noise_multiplier=100.0)
    plans = [_plan(policy, Proposal(total_rounds=1000, batch_size=64), rnd=r) for r in range(1, 5)]
    assert all(isinstance(p, RoundPlan) for p in plans[:3]) and "clamped from 1000 to 3" in plans[0].notes[0]
    assert isinstance(plans[3], Decline) and "max-rounds-per-run = 3" in plans[3].reason
    assert plans[2].epsilon_after <= 3.0


def test_the_same_round_twice_is_not_trained_twice(tmp_path):
    policy = _policy(tmp_path)
    first = _plan(policy, Proposal(total_rounds=10, batch_size=64), rnd=1)
    again = _plan(policy, Proposal(total_rounds=10, batch_size=64), rnd=1)
    assert isinstance(first, RoundPlan) and isinstance(again, Decline) and "already trained round 1" in again.reason
    assert again.epsilon == pytest.approx(first.epsilon_after)


def test_a_round_that_would_be_noise_is_declined(tmp_path):
    policy = _policy(tmp_path, target_epsilon=0.05)
    plan = _plan(policy, Proposal(total_rounds=40, batch_size=64), n=100)
    assert isinstance(plan, Decline)
    assert "above its policy's max-noise-multiplier 50" in plan.reason and "/" not in plan.reason
    assert not policy.ledger_path.exists()  # nothing spent, nothing written


def test_per_run_cap_holds_across_rounds(tmp_path):
    policy = _policy(tmp_path, target_epsilon=10.0, max_epsilon_per_run=1.0, max_epsilon_per_round=1.0)
    for r in range(1, 6):
        plan = _plan(policy, Proposal(total_rounds=5, batch_size=64), rnd=r)
        assert isinstance(plan, RoundPlan)
    with open_ledger(policy.ledger_path, site="st-mary", delta=1e-5, accountant="rdp") as ledger:
        assert epsilon_of(ledger.run_history("run-1"), 1e-5) <= 1.0 + 1e-9
        assert ledger.epsilon() <= 1.0 + 1e-9


def test_spent_budget_declines_and_the_next_run_cannot_recalibrate_into_noise(tmp_path):
    policy = _policy(tmp_path, max_epsilon_per_round=3.0)
    for r in range(1, 4):
        assert isinstance(_plan(policy, Proposal(total_rounds=3, batch_size=400)), RoundPlan if r == 1 else object)
        if r == 1:
            break
    for r in range(2, 4):
        _plan(policy, Proposal(total_rounds=3, batch_size=400), rnd=r)
    nxt = _plan(policy, Proposal(total_rounds=3, batch_size=400), run="run-2")
    assert isinstance(nxt, Decline)
    assert "noise" in nxt.reason or "spent" in nxt.reason


@pytest.mark.parametrize("field,value", [("target_epsilon", math.nan), ("target_epsilon", math.inf),
                                         ("delta", math.nan), ("max_grad_norm", math.inf),
                                         ("max_noise_multiplier", math.nan), ("max_epsilon_per_round", -1.0),
                                         ("accountant", "gdp"), ("max_rounds_per_run", 0)])
def test_bad_policy_values_are_refused(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        _policy(tmp_path, **{field: value})


def test_a_deployed_policy_cannot_turn_dp_off_or_seed_the_noise(tmp_path):
    with pytest.raises(ConfigError, match="always trains with differential privacy"):
        _policy(tmp_path, deployed=True, dp=False)
    with pytest.raises(ConfigError, match="never uses seeded"):
        _policy(tmp_path, deployed=True, seeded=True)


def test_simulation_policy_comes_from_the_run_config(tmp_path):
    privacy = PrivacyConfig(site_epsilons="3,1", randomness="seeded", accountant="prv")
    pol = policy_for_simulation(privacy, "site-1", 1, tmp_path / "l.json", seed=7)
    assert pol.target_epsilon == 1.0 and pol.seeded and pol.accountant == "prv" and not pol.deployed


def test_a_site_that_cannot_afford_a_round_declines_after_one_bound_check(tmp_path, monkeypatch):
    """The declining site of a deployment pays this every round in a fresh process: one accountant curve, at the
    policy's max-noise-multiplier, and no search."""
    from fedtl.privacy import accounting, policy as policy_module

    monkeypatch.setattr(policy_module, "calibrate_noise", lambda *a, **k: pytest.fail("searched for σ"))
    accounting._rdp_curve.cache_clear()
    policy = _policy(tmp_path, target_epsilon=0.05)
    plan = _plan(policy, Proposal(total_rounds=5, batch_size=64), n=100)
    assert isinstance(plan, Decline) and "σ>50 to stay within its policy" in plan.reason, plan
    assert accounting._rdp_curve.cache_info().misses == 1  # the curve at (σ=50, q) only
    assert not policy.ledger_path.exists()


def test_the_calibration_is_kept_in_the_ledger_plan_and_reused_by_the_next_round(tmp_path, monkeypatch):
    from fedtl.privacy import policy as policy_module

    policy = _policy(tmp_path)
    first = _plan(policy, Proposal(total_rounds=10, batch_size=64), rnd=1)
    with open_ledger(policy.ledger_path, site=policy.site, delta=policy.delta, accountant=policy.accountant) as ledger:
        assert ledger.plan["noise_multiplier"] == first.noise_multiplier  # saved with the round's entry
    monkeypatch.setattr(policy_module, "_calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    second = _plan(policy, Proposal(total_rounds=10, batch_size=64), rnd=2)
    assert isinstance(second, RoundPlan) and second.noise_multiplier == first.noise_multiplier
    # the bounded search finds the same σ as the unbounded one whenever one exists
    monkeypatch.undo()
    free = policy_module.calibrate_noise(3.0, 1e-5, 0.16, 60)
    for bound in (free * 1.05, 10.0):
        sigma = policy_module.calibrate_noise(3.0, 1e-5, 0.16, 60, max_sigma=bound)
        assert sigma == pytest.approx(free, rel=0.02) and sigma <= bound
    with pytest.raises(PrivacyBudgetError, match="No noise multiplier reaches"):
        policy_module.calibrate_noise(3.0, 1e-5, 0.16, 60, max_sigma=free * 0.9)


def test_a_plan_that_the_per_round_cap_keeps_from_using_its_budget_says_so(tmp_path):
    """10 rounds at the default per-round cap (a quarter of ε = 3) leave part of the run's ε unused: the site's
    plan says how much and what would use it; 40 rounds (the budget binds) say nothing."""
    short = _plan(_policy(tmp_path / "a"), Proposal(total_rounds=10, batch_size=64))
    (note,) = [n for n in short.notes if "per-round cap" in n]
    used = float(note.split("spend about ε=")[1].split()[0])
    exact = epsilon_of([(short.noise_multiplier, short.sample_rate, short.steps * 10)], 1e-5)
    assert used == pytest.approx(exact, abs=0.005) and used < 0.9 * 3.0
    assert "of the 3.00 this run may take" in note and "more rounds, or a higher max-epsilon-per-round" in note
    long = _plan(_policy(tmp_path / "b"), Proposal(total_rounds=40, batch_size=64))
    assert not any("per-round cap" in n for n in long.notes)
    # a higher per-round cap lets the same 10 rounds spend the budget, with less noise
    raised = _plan(_policy(tmp_path / "c", max_epsilon_per_round=3.0), Proposal(total_rounds=10, batch_size=64))
    assert not any("per-round cap" in n for n in raised.notes)
    assert raised.noise_multiplier < short.noise_multiplier
