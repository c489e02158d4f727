"""Personalization: local DP fine-tuning after the last round, planned in ε from round 1, kept at the site.

The attacks next to the defences: a hostile personalize request (bad epochs, huge values, wrong suffix),
a hostile reply carrying tensors or impossible figures; and the budget, fine-tuning included, never
exceeded — recomputed independently from the ledger with Opacus' accountant.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file

from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig
from fedtl.errors import ConfigError
from fedtl.federation.personal_site import PERSONAL_SUFFIX, personalize_site
from fedtl.federation.personalize import (PERSONAL_METRIC_KEYS, Personalization, PersonalizeRequest, compare,
                                          parse_personal_reply, personal_reply)
from fedtl.federation.site import SiteData, SiteEvalData
from fedtl.model import TransferModel
from fedtl.privacy import PrivacyPolicy, Proposal, open_ledger, plan_personalize, plan_round, read_ledger
from fedtl.privacy.accounting import make_accountant
from fedtl.privacy.policy import Decline, RoundPlan
from tests.conftest import make_tiny_backbone

BUDGET, DELTA = 3.0, 1e-5


def _policy(tmp_path, **kw):
    base = dict(site="st-mary", ledger_path=tmp_path / "site" / "privacy-ledger.json", target_epsilon=BUDGET,
                delta=DELTA, max_noise_multiplier=50.0, max_epsilon_per_round=BUDGET)  # the lifetime budget binds
    return PrivacyPolicy(**{**base, **kw})


def _ledger(policy):
    return open_ledger(policy.ledger_path, site=policy.site, delta=policy.delta, accountant=policy.accountant)


def _train_rounds(policy, rounds, personalize_epochs, n=400, run="run-1", train=None):
    plans = []
    for rnd in range(1, (train or rounds) + 1):
        with _ledger(policy) as ledger:
            plan = plan_round(policy, ledger, Proposal(total_rounds=rounds, batch_size=64,
                                                       personalize_epochs=personalize_epochs),
                              run_id=run, server_round=rnd, num_examples=n)
            assert isinstance(plan, RoundPlan), plan
            ledger.append(run=run, round=rnd, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                          steps=plan.steps)
            ledger.save()
            plans.append(plan)
    return plans


def _personalize(policy, epochs=3, n=400, run="run-1", record=True):
    with _ledger(policy) as ledger:
        plan = plan_personalize(policy, ledger, run_id=run, requested_epochs=epochs, batch_size=64, num_examples=n)
        if record and isinstance(plan, RoundPlan):
            ledger.append(run=run, round=0, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                          steps=plan.steps, kind="personalize")
            ledger.save()
        return plan


def _independent_epsilon(policy) -> float:
    return make_accountant("rdp", read_ledger(policy.ledger_path).history).get_epsilon(DELTA)


# ---- the privacy plan -------------------------------------------------------------------------------------

def test_fine_tuning_is_reserved_from_round_one_and_the_budget_holds_with_it(tmp_path):
    plain = _policy(tmp_path / "a")
    reserved = _policy(tmp_path / "b")
    without = _train_rounds(plain, 4, personalize_epochs=0, train=1)
    with_ft = _train_rounds(reserved, 4, personalize_epochs=3)
    # the rounds pay for the reservation with more noise, decided in round 1
    assert with_ft[0].noise_multiplier > without[0].noise_multiplier
    ft = _personalize(reserved, epochs=3)
    assert isinstance(ft, RoundPlan) and ft.steps == 3 * 7  # 3 epochs of ceil(400 / 64) steps
    # what was reserved pays for it: the same σ (up to the calibration's tolerance)
    assert ft.noise_multiplier == pytest.approx(with_ft[0].noise_multiplier, rel=0.01)
    assert _independent_epsilon(reserved) <= BUDGET + 1e-9
    assert read_ledger(reserved.ledger_path).epsilon() == pytest.approx(ft.epsilon_after)
    again = _personalize(reserved, epochs=3)
    assert isinstance(again, Decline) and "already fine-tuned" in again.reason
    # the fine-tuning is not a round: the run's rounds are still 1..4
    assert read_ledger(reserved.ledger_path).rounds_in_run("run-1") == list(range(1, 5))


def test_a_site_that_did_not_reserve_cannot_afford_it_says_so_and_spends_nothing(tmp_path):
    policy = _policy(tmp_path, max_noise_multiplier=10.0)
    _train_rounds(policy, 4, personalize_epochs=0)  # the whole budget planned for the rounds
    before = _independent_epsilon(policy)
    plan = _personalize(policy, epochs=3)
    assert isinstance(plan, Decline) and "cannot afford" in plan.reason and "keeps the global suffix" in plan.reason
    assert _independent_epsilon(policy) == before <= BUDGET + 1e-9


def test_the_sites_policy_caps_or_refuses_fine_tuning(tmp_path):
    capped = _policy(tmp_path / "a", max_personalize_epochs=1)
    plans = _train_rounds(capped, 5, personalize_epochs=20)  # the server asks for 20 epochs: the site plans 1
    assert any("fine-tuning epochs clamped from 20 to 1" in note for note in plans[0].notes)
    ft = _personalize(capped, epochs=20)
    assert isinstance(ft, RoundPlan) and ft.epochs == 1
    refusing = _policy(tmp_path / "b", max_personalize_epochs=0)
    _train_rounds(refusing, 2, personalize_epochs=5)
    plan = _personalize(refusing, epochs=5)
    assert isinstance(plan, Decline) and "does not fine-tune" in plan.reason
    with pytest.raises(ConfigError, match="max-personalize-epochs"):
        _policy(tmp_path, max_personalize_epochs=10**6)
    with pytest.raises(ConfigError, match="personalization.epochs"):
        FedTLConfig.from_run_config({"personalization.kind": "finetune", "personalization.epochs": 0})
    with pytest.raises(ConfigError, match="personalization.kind"):
        FedTLConfig.from_run_config({"personalization.kind": "fedprox"})


# ---- the request and the reply ---------------------------------------------------------------------------

def test_a_hostile_personalize_request_is_refused_at_the_site():
    good = {"run-id": "r", "epochs": 2, "num-classes": 2, "backbone-sha256": "a" * 64}
    assert PersonalizeRequest.parse(good).epochs == 2
    for bad in ({"epochs": 0}, {"epochs": 21}, {"epochs": 1e12}, {"epochs": float("nan")}, {"epochs": True},
                {"epochs": "3"}, {"epochs": 2.5}, {"run-id": ""}, {"run-id": "x" * 500}, {"num-classes": 1},
                {"num-classes": 10**9}, {"backbone-sha256": "../../etc"}):
        with pytest.raises(ValueError):
            PersonalizeRequest.parse({**good, **bad})
    with pytest.raises(ValueError, match="epochs"):
        PersonalizeRequest.parse({k: v for k, v in good.items() if k != "epochs"})


def _figs(auc_val=0.8, auc_test=0.7):
    return {"val": {"n": 40, "auc": auc_val, "acc": 0.7, "loss": 0.5}, "test": {"n": 60, "auc": auc_test, "acc": 0.6,
                                                                                 "loss": 0.6}}


def test_the_reply_holds_figures_only_and_round_trips():
    reply = personal_reply({"global": _figs(), "tuned": _figs(0.9, 0.85)}, site="st-mary", personalized=True,
                           kept_tuned=True, epsilon=2.9)
    assert len(reply.array_records) == 0 and set(reply["metrics"].keys()) == set(PERSONAL_METRIC_KEYS)
    site, parsed, _ = parse_personal_reply(reply)
    assert site == "st-mary" and parsed["kept_tuned"] and parsed["epsilon"] == 2.9
    assert parsed["tuned_test"]["auc"] == 0.85 and parsed["global_val"]["n"] == 40
    refused = parse_personal_reply(personal_reply(None, site="x", reason="invalid personalize request"))[1]
    assert not refused["personalized"] and math.isnan(refused["global_test"]["auc"]) and refused["epsilon"] is None


def _tampered(**changes) -> RecordDict:
    reply = personal_reply({"global": _figs(), "tuned": _figs()}, site="evil", personalized=True, epsilon=1.0)
    values = dict(reply["metrics"])
    for key, value in changes.items():
        values.pop(key) if value is None else values.__setitem__(key, value)
    return RecordDict({"metrics": MetricRecord(values), "info": reply["info"]})


@pytest.mark.parametrize("changes,match", [
    ({"extra": 1.0}, "unexpected"), ({"tuned-test-auc": None}, "missing"), ({"tuned-test-auc": 1.5}, "tuned-test-auc"),
    ({"global-val-n": 1e12}, "global-val-n"), ({"epsilon": -3.0}, "epsilon"), ({"epsilon": float("inf")}, "epsilon"),
    ({"personalized": 0, "kept-tuned": 1}, "kept-tuned"), ({"global-test-loss": 1e9}, "global-test-loss"),
])
def test_a_malformed_reply_is_rejected_with_the_reason(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_personal_reply(_tampered(**changes))


def test_a_reply_carrying_tensors_is_refused():
    reply = personal_reply({"global": _figs(), "tuned": _figs()}, site="leaky", personalized=True, epsilon=1.0)
    leaky = RecordDict({"metrics": reply["metrics"], "info": reply["info"],
                        "arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})})
    with pytest.raises(ValueError, match="tensors"):
        parse_personal_reply(leaky)


def test_the_summary_table_names_the_worst_site_and_the_largest_loss():
    p = Personalization()
    for site, (g, t, kept) in {"a": (0.95, 0.96, True), "b": (0.70, 0.82, True), "c": (0.90, 0.895, True)}.items():
        _, parsed, _ = parse_personal_reply(personal_reply({"global": _figs(0.8, g), "tuned": _figs(0.9, t)}, site=site,
                                                           personalized=True, kept_tuned=kept, epsilon=1.0))
        p.add(site, parsed, "")
    t = p.table()
    assert t["worst_site"] == "b" and t["worst_global_auc"] == 0.70 and t["worst_personal_auc"] == 0.82
    assert t["worst_site_gain"] == pytest.approx(0.12) and t["max_loss"] == pytest.approx(0.005)
    assert compare({})["worst_site"] is None


# ---- the site: fine-tunes, keeps the better suffix on validation, saves it in its state dir -------------------

def _site_data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 16, generator=g)
    x[:, 3] += 1.5 * (2 * y - 1)
    return x, y


def test_a_site_fine_tunes_with_dp_and_keeps_its_suffix_in_its_state_dir(tmp_path):
    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded"})
    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    global_state = {k: v.clone() for k, v in model.trainable_state().items()}
    x, y = _site_data()
    xv, yv = _site_data(80, seed=1)
    data, evald = SiteData("st-mary", x, y, True), SiteEvalData("st-mary", {"val": (xv, yv), "test": (xv, yv)})
    policy = _policy(tmp_path, seeded=True)
    _train_rounds(policy, 3, personalize_epochs=2, n=200)
    out = personalize_site(cfg, model, data, evald, policy, run_id="run-1", epochs=2)
    assert out.personalized and out.epsilon <= BUDGET and out.kept_tuned
    assert out.figures["tuned"]["val"]["auc"] >= out.figures["global"]["val"]["auc"]
    path = tmp_path / "site" / PERSONAL_SUFFIX
    assert out.path == path and path.is_file()
    saved = load_file(str(path))
    assert set(saved) == set(global_state) and any(not torch.equal(saved[k], global_state[k]) for k in saved)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["kept"] == "tuned" and fh.metadata()["run"] == "run-1"
    entries = read_ledger(policy.ledger_path).entries
    assert entries[-1]["kind"] == "personalize" and _independent_epsilon(policy) <= BUDGET + 1e-9
    # a second request in the same run spends nothing and leaves the saved suffix alone
    model.load_trainable_state(global_state)
    again = personalize_site(cfg, model, data, evald, policy, run_id="run-1", epochs=2)
    assert not again.personalized and "already" in again.reason
    assert len(read_ledger(policy.ledger_path).entries) == len(entries)
    assert all(torch.equal(load_file(str(path))[k], saved[k]) for k in saved)


def test_a_site_whose_budget_is_spent_keeps_the_global_suffix_and_writes_nothing(tmp_path):
    cfg = FedTLConfig()
    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    x, y = _site_data()
    policy = _policy(tmp_path, max_noise_multiplier=10.0)
    _train_rounds(policy, 4, personalize_epochs=0, n=200)
    out = personalize_site(cfg, model, SiteData("st-mary", x, y, True), None, policy, run_id="run-1", epochs=2)
    assert not out.personalized and "cannot afford" in out.reason
    assert not (tmp_path / "site" / PERSONAL_SUFFIX).exists()
    reply = personal_reply(out.figures, site=policy.site, personalized=out.personalized, epsilon=out.epsilon,
                           reason=out.reason)
    assert len(reply.array_records) == 0 and "cannot afford" in parse_personal_reply(reply)[2]


def test_the_fine_tuning_itself_is_held_to_the_per_round_cap(tmp_path):
    from fedtl.privacy import epsilon_of

    policy = _policy(tmp_path, max_epsilon_per_round=0.0)  # default: a quarter of the budget per round
    plan = _personalize(policy, epochs=5, record=False)
    assert isinstance(plan, RoundPlan)
    assert epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps)], DELTA) <= BUDGET / 4 + 1e-9


def test_the_site_keeps_the_fine_tuned_suffix_only_on_validation_evidence():
    from fedtl.federation.personal_site import choose_personal

    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    g = {k: v.clone() for k, v in model.trainable_state().items()}  # zeros: every score ties (AUC 0.5)
    xv, yv = _site_data(120, seed=1)
    tuned = {k: v.clone() for k, v in g.items()}
    tuned["suffix.head.0.weight"][1, 3], tuned["suffix.head.0.weight"][0, 3] = 1.0, -1.0  # the informative feature
    ev = SiteEvalData("st-mary", {"val": (xv, yv)})
    # 1. a clearly better fine-tuned suffix is kept (a blend or the suffix itself)
    model.load_trainable_state(g)
    alpha, kept, evidence = choose_personal(model, g, tuned, ev)
    assert evidence > 0.2 and alpha in (0.5, 1.0)
    assert torch.allclose(kept["suffix.head.0.weight"], alpha * tuned["suffix.head.0.weight"])
    # a fine-tuned suffix that ranks worse is not kept, nor is any blend of it
    worse = {k: -v for k, v in tuned.items()}
    alpha, kept, evidence = choose_personal(model, tuned, worse, ev)
    assert evidence < 0
    # 2. a "fine-tuned" suffix identical to the global one is no evidence: a tie keeps the global suffix
    alpha, kept, evidence = choose_personal(model, g, g, ev)
    assert not evidence > 0
    # 3. one class in validation (AUC undefined), or no validation data: no evidence, the global suffix
    one = SiteEvalData("st-mary", {"val": (xv[yv == 1], yv[yv == 1])})
    assert choose_personal(model, g, tuned, one)[0] == 0.0
    assert math.isnan(choose_personal(model, g, tuned, None)[2])
    assert all(torch.equal(model.trainable_state()[k], g[k]) for k in g)  # the model is left on the global suffix


# ---- personalize-dp = false: no noise, nothing reserved or spent, and only the site's own file says so ----------

def test_a_site_that_fine_tunes_without_noise_reserves_and_spends_nothing(tmp_path):
    plain = _train_rounds(_policy(tmp_path / "a"), 4, personalize_epochs=0, train=1)
    local = _policy(tmp_path / "b", personalize_dp=False)
    rounds = _train_rounds(local, 4, personalize_epochs=3)
    # the rounds do not pay for a fine-tuning that spends no ε: the same σ as without personalization
    assert rounds[0].noise_multiplier == pytest.approx(plain[0].noise_multiplier, rel=1e-9)
    spent = read_ledger(local.ledger_path).epsilon()
    with _ledger(local) as ledger:
        plan = plan_personalize(local, ledger, run_id="run-1", requested_epochs=3, batch_size=64, num_examples=400)
    assert isinstance(plan, RoundPlan) and plan.noise_multiplier == 0.0 and plan.steps == 3 * 7
    assert plan.epsilon_before == plan.epsilon_after == pytest.approx(spent)
    # the policy still caps the epochs a server asks for
    capped = _policy(tmp_path / "c", personalize_dp=False, max_personalize_epochs=1)
    with _ledger(capped) as ledger:
        assert plan_personalize(capped, ledger, run_id="r", requested_epochs=20, batch_size=64,
                                num_examples=400).epochs == 1
    with pytest.raises(ConfigError, match="personalize-dp"):
        _policy(tmp_path, personalize_dp="false")


def test_a_site_fine_tunes_without_noise_keeps_its_ledger_as_it_was_and_marks_the_suffix(tmp_path):
    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded"})
    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    x, y = _site_data()
    xv, yv = _site_data(80, seed=1)
    data, evald = SiteData("st-mary", x, y, True), SiteEvalData("st-mary", {"val": (xv, yv), "test": (xv, yv)})
    policy = _policy(tmp_path, seeded=True, personalize_dp=False)
    _train_rounds(policy, 3, personalize_epochs=2, n=200)
    before = read_ledger(policy.ledger_path).entries
    out = personalize_site(cfg, model, data, evald, policy, run_id="run-1", epochs=2)
    assert out.personalized and out.kept_tuned
    assert out.epsilon == pytest.approx(_independent_epsilon(policy)) and out.epsilon <= BUDGET
    assert read_ledger(policy.ledger_path).entries == before  # no entry: nothing was spent
    with safe_open(str(tmp_path / "site" / PERSONAL_SUFFIX), "pt") as fh:
        assert fh.metadata()["dp"] == "false" and fh.metadata()["kept"] == "tuned"
    # the DP site of the test above marks its suffix as private
    dp_policy = _policy(tmp_path / "dp", seeded=True)
    _train_rounds(dp_policy, 3, personalize_epochs=2, n=200)
    model2 = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    personalize_site(cfg, model2, data, evald, dp_policy, run_id="run-1", epochs=2)
    with safe_open(str(tmp_path / "dp" / "site" / PERSONAL_SUFFIX), "pt") as fh:
        assert fh.metadata()["dp"] == "true"


def test_a_run_config_cannot_turn_off_a_deployed_sites_private_fine_tuning(tmp_path, caplog, monkeypatch):
    """The attack: a server's run config says privacy.personalize-dp=false. A deployed site's policy comes from its
    site.toml alone, so it still fine-tunes with DP, and it logs that it ignored the setting."""
    from fedtl.federation.deployment import load_site_config
    from fedtl.federation.handlers import _site_of
    from fedtl.privacy.policy import personalizes_privately

    monkeypatch.delenv("FEDTL_WEIGHTS_DIR", raising=False)  # loading a site config sets it: restored after the test
    load_site_config.cache_clear()

    (tmp_path / "site.toml").write_text(f'name = "s1"\nstate-dir = "{tmp_path / "state"}"\n'
                                        '[data]\nformat = "medmnist"\npath = "m.npz"\n')
    hostile = FedTLConfig.from_run_config({"privacy.personalize-dp": False})
    with caplog.at_level("WARNING"):
        policy, _ = _site_of(hostile, {"site-config": str(tmp_path / "site.toml")}, None, data=object())
    assert policy.personalize_dp and personalizes_privately(policy)
    assert "privacy.personalize-dp=False (site: True)" in caplog.text
    (tmp_path / "local.toml").write_text(f'name = "s1"\nstate-dir = "{tmp_path / "state"}"\n'
                                         '[data]\nformat = "medmnist"\npath = "m.npz"\n[privacy]\npersonalize-dp = false\n')
    policy, _ = _site_of(FedTLConfig(), {"site-config": str(tmp_path / "local.toml")}, None, data=object())
    assert not personalizes_privately(policy)
    load_site_config.cache_clear()


# ---- using the personal suffix: fedtl predict / export --suffix ------------------------------------------------

def test_predict_uses_a_sites_personal_suffix_of_the_same_run_and_refuses_others(tmp_path, monkeypatch):
    import json

    import fedtl.backbones
    from safetensors.torch import save_file

    from fedtl.errors import BackboneError
    from fedtl.inference import load_run

    backbone = make_tiny_backbone()
    monkeypatch.setattr(fedtl.backbones, "build_backbone", lambda name: backbone)
    cfg = FedTLConfig.from_run_config({"model.pooling": "avg", "train.lr": 0.5})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_run_config()))
    model = TransferModel(backbone, 2, cfg.model, cfg.adapters)
    global_state = {k: v.clone() for k, v in model.trainable_state().items()}
    run_meta = {"backbone": cfg.model.backbone, "weights_sha256": backbone.weights_sha256, "run": "run-1", "round": "3"}
    save_file(global_state, run_dir / "suffix.safetensors", metadata=run_meta)
    # the site fine-tunes (no noise: its own choice) and keeps its suffix, with a rule chosen on its validation split
    x, y = _site_data()
    xv, yv = _site_data(80, seed=1)
    policy = _policy(tmp_path, personalize_dp=False)
    out = personalize_site(cfg, model, SiteData("st-mary", x, y, True),
                           SiteEvalData("st-mary", {"val": (xv, yv), "test": (xv, yv)}), policy, run_id="run-1", epochs=2)
    assert out.kept_tuned
    personal = load_file(str(out.path))

    run = load_run(run_dir, suffix=out.path)
    assert all(torch.equal(run.model.trainable_state()[k], personal[k]) for k in personal)
    assert run.metadata["site"] == "st-mary" and run.metadata["kept"] == "tuned" and run.metadata["dp"] == "false"
    assert "the site's validation split (80 images)" in run.decision.describe()
    assert load_run(run_dir).decision.rule == "argmax"  # the run's own suffix is untouched

    def variant(name, **meta):
        with safe_open(str(out.path), "pt") as fh:
            base = dict(fh.metadata())
        path = tmp_path / name
        save_file(personal, path, metadata={k: v for k, v in {**base, **meta}.items() if v is not None})
        return path

    with pytest.raises(ConfigError, match="not a site's personal suffix"):
        load_run(run_dir, suffix=run_dir / "suffix.safetensors")  # the run's own file is not a personal one
    with pytest.raises(ConfigError, match="fine-tuned from run `run-9`"):
        load_run(run_dir, suffix=variant("other-run.safetensors", run="run-9"))
    with pytest.raises(BackboneError, match="not this run's prefix"):
        load_run(run_dir, suffix=variant("other-weights.safetensors", weights_sha256="ab" * 32))
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(run_dir, suffix=tmp_path / "nowhere.safetensors")
    wrong_shape = tmp_path / "wrong-shape.safetensors"
    save_file({k: torch.zeros(3, *v.shape[1:]) for k, v in personal.items()}, wrong_shape, metadata={"kept": "tuned"})
    with pytest.raises(Exception, match=r"expected \(2, 16\)"):  # a 3-class suffix does not fit the 2-class run
        load_run(run_dir, suffix=wrong_shape)

    # a site whose validation split is too small to choose a rule keeps the global suffix with the run's rule, not a
    # threshold chosen on 3 images of a class (nor the argmax the run did not choose)
    from fedtl.decision import Decision

    ruled = {**run_meta, **Decision("threshold", 0.3, 1, "central validation (500 images)").to_metadata()}
    save_file(global_state, run_dir / "suffix.safetensors", metadata=ruled)
    few = torch.cat([torch.nonzero(yv == 0).flatten()[:3], torch.nonzero(yv == 1).flatten()])
    small = personalize_site(cfg, model, SiteData("st-mary", x, y, True),
                             SiteEvalData("st-mary", {"val": (xv[few], yv[few]), "test": (xv, yv)}),
                             _policy(tmp_path / "small", personalize_dp=False), run_id="run-1", epochs=2)
    assert not small.kept_tuned
    with safe_open(str(small.path), "pt") as fh:
        assert fh.metadata()["decision-from"] == "run" and "fedtl.decision" not in fh.metadata()
    assert load_run(run_dir, suffix=small.path).decision == load_run(run_dir).decision
    ones = torch.nonzero(yv == 1).flatten()  # one class: no rule can be chosen on it either
    single = personalize_site(cfg, model, SiteData("st-mary", x, y, True),
                              SiteEvalData("st-mary", {"val": (xv[ones], yv[ones]), "test": (xv, yv)}),
                              _policy(tmp_path / "single", personalize_dp=False), run_id="run-1", epochs=2)
    assert not single.kept_tuned and load_run(run_dir, suffix=single.path).decision.threshold == 0.3
    assert load_run(run_dir).decision.threshold == 0.3


def test_a_validation_split_too_small_to_resample_is_no_evidence():
    """The class-stratified bootstrap keeps each class's count: with one image of a class every resample holds that
    image, and any candidate that ranks it right has a "lower bound" equal to its point gain. A site must not keep a
    personal suffix on such a split (a simulated RetinaMNIST site did, on 6 images, and lost 0.035 test AUC)."""
    from fedtl.evaluation import MIN_PER_CLASS, auc_gain_bound, too_few_to_weigh
    from fedtl.federation.personal_site import choose_personal
    from fedtl.training import evaluate_suffix

    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    g = {k: v.clone() for k, v in model.trainable_state().items()}
    tuned = {k: v.clone() for k, v in g.items()}
    tuned["suffix.head.0.weight"][1, 3], tuned["suffix.head.0.weight"][0, 3] = 1.0, -1.0  # the informative feature
    xv, yv = _site_data(400, seed=1)

    def split(per_class):  # the first `per_class[c]` validation images of each class c
        idx = torch.cat([torch.nonzero(yv == c).flatten()[:n] for c, n in enumerate(per_class)])
        return SiteEvalData("st-mary", {"val": (xv[idx], yv[idx])})

    assert too_few_to_weigh(np.array([0, 1, 1, 1, 1, 1])) == 1 and too_few_to_weigh(np.array([0] * 10 + [1] * 10)) == 0
    def bound(state, ev, **kw):  # the gate's own figure on that split
        feats, labels = ev.splits["val"]
        model.load_trainable_state(state)
        p = evaluate_suffix(model, feats, labels).probabilities
        model.load_trainable_state(g)
        return auc_gain_bound(evaluate_suffix(model, feats, labels).probabilities, p, labels.numpy(), **kw)

    assert bound(tuned, split((1, 5)), min_per_class=1) > 0  # the attack: without the minimum, 6 images "decide"
    assert math.isnan(bound(tuned, split((1, 5))))
    for tiny in ((1, 5), (MIN_PER_CLASS - 1, 50)):
        alpha, kept, evidence = choose_personal(model, g, tuned, split(tiny))
        assert math.isnan(evidence) and alpha == 0.0 and all(torch.equal(kept[k], g[k]) for k in g)
    alpha, kept, evidence = choose_personal(model, g, tuned, split((MIN_PER_CLASS, MIN_PER_CLASS)))
    assert evidence > 0 and alpha in (0.5, 1.0)  # the same candidate, with enough of each class to weigh it


def test_a_site_that_weighed_a_candidate_and_kept_the_global_suffix_says_why(tmp_path):
    """Every site of a run keeping the global suffix looks like a failure unless the report says why: the site sends
    the reason (no count of its validation classes), the server lists it beside the site."""
    from fedtl.evaluation import MIN_PER_CLASS

    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded"})
    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    x, y = _site_data()
    xv, yv = _site_data(80, seed=1)
    keep = torch.cat([torch.nonzero(yv == 0).flatten()[:3], torch.nonzero(yv == 1).flatten()])  # 3 of class 0
    policy = _policy(tmp_path, dp=False, seeded=True)  # a simulation without DP: a fine-tuned candidate, no ledger
    out = personalize_site(cfg, model, SiteData("st-mary", x, y, True),
                           SiteEvalData("st-mary", {"val": (xv[keep], yv[keep]), "test": (xv, yv)}), policy,
                           run_id="r1", epochs=3)
    assert out.personalized and not out.kept_tuned
    assert f"fewer than {MIN_PER_CLASS} images of some class" in out.reason and "3" not in out.reason
    summary = Personalization()
    summary.add(*parse_personal_reply(personal_reply(out.figures, site=out.site, personalized=True, kept_tuned=False,
                                                     reason=out.reason)))
    assert summary.table()["skipped"] == {"st-mary": out.reason} and summary.sites["st-mary"]["kept"] == "global"
