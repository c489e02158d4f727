"""personalization.kind = local-head: a head of the site's own, trained in the rounds' private steps, kept, never sent.

Attacks next to the defences: a local head that escapes the per-example clip (it would be trained on un-noised
gradients), a damaged or foreign local-head file in the state dir, a hostile request asking for an unknown kind,
and the train reply, which must carry exactly the suffix a site without a local head sends.
"""

import copy
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig, TrainConfig
from fedtl.errors import ConfigError
from fedtl.federation.local_head import LOCAL_HEAD, local_head_for_round, read_local_head, with_local_head
from fedtl.federation.personal_site import PERSONAL_SUFFIX, personalize_site
from fedtl.federation.personalize import PersonalizeRequest
from fedtl.federation.records import TrainRequest
from fedtl.federation.site import SiteData, SiteEvalData, train_site
from fedtl.model import TransferModel
from fedtl.privacy import PrivacyPolicy, Proposal, read_ledger
from fedtl.privacy.policy import steps_per_epoch
from fedtl.training import DPSettings, train_suffix
from tests.conftest import make_tiny_backbone
from tests.unit.federation.test_personalize import _site_data

BUDGET, DELTA = 3.0, 1e-5


def _model(kind="none", blocks=0, classes=2) -> TransferModel:
    return TransferModel(make_tiny_backbone(), classes, ModelConfig(pooling="avg"), AdaptersConfig(kind=kind, blocks=blocks))


def _data(n=120, seed=0):
    return _site_data(n, seed)  # two classes, one informative feature


def _policy(tmp_path, **kw):
    base = dict(site="st-mary", ledger_path=tmp_path / "site" / "privacy-ledger.json", target_epsilon=BUDGET,
                delta=DELTA, max_noise_multiplier=50.0, seeded=True)
    return PrivacyPolicy(**{**base, **kw})


# ---- training: the shared tensors train as without it; the local head trains on its own loss -------------------

@pytest.mark.parametrize("kind,blocks", [("none", 0), ("unfreeze", 1)])
def test_the_update_is_what_it_would_be_without_a_local_head_and_the_local_head_is_a_plain_head(kind, blocks):
    model = _model(kind, blocks)
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    feats, y = model.prefix_features(x), torch.arange(40) % 2
    feats[y == 1] += 0.5
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.2, momentum=0.9, weight_decay=0.01)
    plain = copy.deepcopy(model)
    local = copy.deepcopy(model.suffix.head)
    with torch.no_grad():  # a local head from earlier rounds: not the global head
        for p in local.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    start = copy.deepcopy(local)
    train_suffix(plain, feats, y, cfg, generator=torch.Generator().manual_seed(0))
    train_suffix(model, feats, y, cfg, generator=torch.Generator().manual_seed(0), local_head=local)
    for k, v in plain.trainable_state().items():  # what the site sends: as if it kept no local head
        assert torch.allclose(model.trainable_state()[k], v, atol=1e-6), k
    assert all(not torch.allclose(a, b) for a, b in zip(local.parameters(), start.parameters()))
    if kind == "none":  # over fixed features the local head is a head trained alone from where it was
        fresh = _model(kind, blocks)
        fresh.suffix.head.load_state_dict(start.state_dict())
        train_suffix(fresh, feats, y, cfg, generator=torch.Generator().manual_seed(0))
        for a, b in zip(local.parameters(), fresh.suffix.head.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    assert not local.training and not model.training


def test_one_clip_bounds_the_update_and_the_local_head_together():
    """The attack: a local head outside the per-example clip would learn from un-noised gradients, and what it
    predicts at the site would then not be covered by the site's ε."""
    model = _model()
    x, y = _data(1)
    local = copy.deepcopy(model.suffix.head)
    before = torch.cat([p.detach().flatten().clone() for p in [*model.suffix.head.parameters(), *local.parameters()]])
    clip, lr = 1e-3, 1.0
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0 / steps_per_epoch(1, 1))
    train_suffix(model, x, y, TrainConfig(epochs=1, batch_size=1, lr=lr, momentum=0.0, weight_decay=0.0), dp=dp,
                 generator=torch.Generator().manual_seed(0), reseed=False, local_head=local)
    after = torch.cat([p.detach().flatten() for p in [*model.suffix.head.parameters(), *local.parameters()]])
    moved = float((after - before).norm())
    assert moved <= lr * clip * (1 + 1e-4)  # both heads within one clipping norm
    assert moved >= 0.99 * lr * clip  # and clipped, not lost: each head alone would have moved lr·clip
    one = float((after - before)[: before.numel() // 2].norm())
    assert one == pytest.approx(lr * clip / 2 ** 0.5, rel=1e-3)  # the heads start equal: each gets half the square


def test_standardized_training_rewrites_the_local_head_and_returns_it_in_raw_coordinates():
    from fedtl.standardize import FeatureStandardizer

    model = _model()
    x, y = _data(64)
    x = 5.0 + 3.0 * x
    stats = FeatureStandardizer.from_reference(x, 1.0)
    local = copy.deepcopy(model.suffix.head)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.3)
    plain = copy.deepcopy(model)
    train_suffix(plain, x, y, cfg, generator=torch.Generator().manual_seed(0), standardize=stats)
    train_suffix(model, x, y, cfg, generator=torch.Generator().manual_seed(0), standardize=stats, local_head=local)
    for a, b in zip(local.parameters(), plain.suffix.head.parameters()):
        assert torch.allclose(a, b, atol=1e-5)  # same function as the head trained alone, in raw coordinates


# ---- the site: trains and keeps it, never sends it, reads back only its own ----------------------------------

def _round(cfg, model, policy, data, rnd, run="run-1", local=True):
    return train_site(cfg, model, data, policy, run_id=run, server_round=rnd,
                      proposal=Proposal(total_rounds=4, batch_size=32), local_head=local)


def test_a_site_keeps_its_local_head_across_rounds_and_sends_exactly_the_suffix(tmp_path):
    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded",
                                       "personalization.kind": "local-head"})
    model = _model()
    x, y = _data()
    data, policy = SiteData("st-mary", x, y, True), _policy(tmp_path)
    start = {k: v.clone() for k, v in model.trainable_state().items()}
    out = _round(cfg, model, policy, data, 1)
    assert not out.declined
    assert set(model.trainable_state()) == set(start)  # the reply's tensors: the suffix's, nothing else
    path = tmp_path / "site" / LOCAL_HEAD
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["run"] == "run-1" and fh.metadata()["round"] == "1" and fh.metadata()["dp"] == "true"
    saved = load_file(str(path))
    assert set(saved) == {"0.weight", "0.bias"}
    # round 2 starts from the site's own head, not from the global head the server sends
    model.load_trainable_state(start)
    head = local_head_for_round(model, policy, "run-1")
    assert torch.equal(head[0].weight, saved["0.weight"]) and not torch.equal(head[0].weight, model.suffix.head[0].weight)
    entries = len(read_ledger(policy.ledger_path).entries)
    _round(cfg, model, policy, data, 2)
    assert len(read_ledger(policy.ledger_path).entries) == entries + 1  # one entry a round: no ε of its own
    assert not torch.equal(load_file(str(path))["0.weight"], saved["0.weight"])
    # a new run starts from the global head it receives
    model.load_trainable_state(start)
    assert torch.equal(local_head_for_round(model, policy, "run-2")[0].weight, start["suffix.head.0.weight"])


def test_a_site_whose_policy_refuses_personalization_keeps_no_local_head(tmp_path):
    cfg = FedTLConfig.from_run_config({"privacy.randomness": "seeded"})
    model = _model()
    x, y = _data()
    policy = _policy(tmp_path, max_personalize_epochs=0)
    assert not _round(cfg, model, policy, SiteData("st-mary", x, y, True), 1).declined
    assert not (tmp_path / "site" / LOCAL_HEAD).exists()


@pytest.mark.parametrize("damage", ["garbage", "shape", "nan", "foreign-run"])
def test_a_damaged_or_foreign_local_head_is_ignored_and_the_site_starts_from_the_global_head(tmp_path, damage, caplog):
    model = _model()
    policy = _policy(tmp_path)
    path = tmp_path / "site" / LOCAL_HEAD
    path.parent.mkdir(parents=True)
    good = {"0.weight": torch.ones(2, 16), "0.bias": torch.ones(2)}
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    elif damage == "shape":
        save_file({"0.weight": torch.ones(3, 16), "0.bias": torch.ones(3)}, str(path), metadata={"run": "run-1"})
    elif damage == "nan":
        save_file({**good, "0.bias": torch.tensor([float("nan"), 0.0])}, str(path), metadata={"run": "run-1"})
    else:
        save_file(good, str(path), metadata={"run": "run-0"})
    with caplog.at_level(logging.INFO):
        head, why = read_local_head(model, policy, "run-1")
        assert head is None and why
        fresh = local_head_for_round(model, policy, "run-1")
    assert torch.equal(fresh[0].weight, model.suffix.head[0].weight)  # the global head
    assert "local head" in caplog.text
    # and a damaged file never stops a round: the site trains and writes a good one
    x, y = _data()
    cfg = FedTLConfig.from_run_config({"privacy.randomness": "seeded"})
    assert not _round(cfg, model, policy, SiteData("st-mary", x, y, True), 1).declined
    assert read_local_head(model, policy, "run-1")[0] is not None


# ---- after the last round: global suffix or global + local head, on validation evidence, nothing spent ----------

def test_after_the_last_round_the_site_weighs_its_local_head_and_spends_nothing(tmp_path):
    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded",
                                       "personalization.kind": "local-head"})
    model = _model()
    x, y = _data()
    xv, yv = _data(80, seed=1)
    data, policy = SiteData("st-mary", x, y, True), _policy(tmp_path)
    evald = SiteEvalData("st-mary", {"val": (xv, yv), "test": (xv, yv)})
    for rnd in (1, 2, 3):
        _round(cfg, model, policy, data, rnd)
    global_state = {k: torch.zeros_like(v) for k, v in model.trainable_state().items()}  # ranks nothing (AUC 0.5)
    model.load_trainable_state(global_state)
    eps = read_ledger(policy.ledger_path).epsilon()
    entries = len(read_ledger(policy.ledger_path).entries)
    out = personalize_site(cfg, model, data, evald, policy, run_id="run-1", epochs=2, kind="local-head")
    assert out.personalized and out.kept_tuned and out.epsilon == pytest.approx(eps)
    assert len(read_ledger(policy.ledger_path).entries) == entries  # nothing trained, nothing spent
    assert out.figures["tuned"]["val"]["auc"] > out.figures["global"]["val"]["auc"] + 0.2
    saved = load_file(str(tmp_path / "site" / PERSONAL_SUFFIX))
    local = load_file(str(tmp_path / "site" / LOCAL_HEAD))
    assert set(saved) == set(global_state)
    blend = saved["suffix.head.0.weight"] / local["0.weight"]
    assert torch.allclose(blend, blend.flatten()[0].expand_as(blend)) and float(blend.flatten()[0]) in (0.5, 1.0)
    with safe_open(str(tmp_path / "site" / PERSONAL_SUFFIX), "pt") as fh:
        meta = fh.metadata()
    assert meta["personalization"] == "local-head" and meta["kept"] == "tuned" and meta["dp"] == "true"
    assert meta["epochs"] == "0"
    # another run's request finds no local head of its own: the global suffix, nothing written
    (tmp_path / "site" / PERSONAL_SUFFIX).unlink()
    other = personalize_site(cfg, model, data, evald, policy, run_id="run-9", epochs=2, kind="local-head")
    assert not other.personalized and "another run" in other.reason
    assert not (tmp_path / "site" / PERSONAL_SUFFIX).exists()


def test_with_local_head_replaces_only_the_head():
    model = _model("unfreeze", 1)
    state = model.trainable_state()
    head = copy.deepcopy(model.suffix.head)
    with torch.no_grad():
        head[0].weight.fill_(7.0)
    mixed = with_local_head(state, head)
    assert torch.equal(mixed["suffix.head.0.weight"], head[0].weight)
    assert all(torch.equal(mixed[k], v) for k, v in state.items() if not k.startswith("suffix.head."))
    with pytest.raises(ValueError, match="not in the suffix"):
        with_local_head({"suffix.blocks.x": torch.zeros(1)}, head)


# ---- what crosses the wire -------------------------------------------------------------------------------------

def test_hostile_requests_are_refused():
    base = {"run-id": "r", "epochs": 2, "num-classes": 2}
    assert PersonalizeRequest.parse(base).kind == "finetune"  # a server of before this option
    assert PersonalizeRequest.parse({**base, "kind": "local-head"}).kind == "local-head"
    for bad in ("local_head", "", 1, ["local-head"]):
        with pytest.raises(ValueError, match="kind"):
            PersonalizeRequest.parse({**base, "kind": bad})
    train = {"server-round": 1, "total-rounds": 3, "run-id": "r"}
    assert not TrainRequest.parse(train).local_head
    assert TrainRequest.parse({**train, "local-head": 1}).local_head
    for bad in (2, -1, 0.5, "yes"):
        with pytest.raises(ValueError, match="local-head"):
            TrainRequest.parse({**train, "local-head": bad})


def test_the_config_and_the_plan():
    cfg = FedTLConfig.from_run_config({"personalization.kind": "local-head"})
    assert cfg.personalization.requested_epochs == 0  # nothing reserved: it spends no ε of its own
    with pytest.raises(ConfigError, match="personalization.kind"):
        FedTLConfig.from_run_config({"personalization.kind": "fedper"})
    from fedtl.planning import run_params

    model = _model()
    plain = run_params(model, FedTLConfig())
    assert run_params(model, cfg) == 2 * plain  # the head twice: its share of the clipping norm
    lora = _model("unfreeze", 1)
    head = sum(p.numel() for p in lora.suffix.head.parameters())
    assert run_params(lora, FedTLConfig.from_run_config({"personalization.kind": "local-head", "adapters.kind": "unfreeze",
                                                          "adapters.blocks": 1})) \
        == run_params(lora, FedTLConfig.from_run_config({"adapters.kind": "unfreeze", "adapters.blocks": 1})) + head


@pytest.mark.slow
def test_a_deployed_site_asked_for_a_local_head_keeps_it_in_its_state_dir_and_sends_the_suffix_alone(tmp_path,
                                                                                                   monkeypatch):
    from flwr.app import ConfigRecord, RecordDict

    from fedtl.federation.handlers import handle_train
    from tests.unit.federation.test_worker import _warm_site

    site, content = _warm_site(tmp_path, monkeypatch)

    def train(rnd, **config):
        sent = RecordDict({"config": ConfigRecord({**dict(content["config"]), "server-round": rnd, **config}),
                           "arrays": content["arrays"]})
        import time

        return handle_train(sent, {}, {"site-config": str(site)}, 1, received_at=time.monotonic())

    for bad in (3, "1"):  # a hostile value: refused before anything is planned or spent
        reply = train(1, **{"local-head": bad})
        assert reply["metrics"]["declined"] == 1 and "local-head" in str(reply["info"]["reason"])
    assert not (tmp_path / "state" / LOCAL_HEAD).exists()
    reply = train(1, **{"local-head": 1})
    assert reply["metrics"]["declined"] == 0, reply["info"]["reason"]
    sent_back = next(iter(reply.array_records.values()))
    assert sorted(sent_back.keys()) == sorted(content["arrays"].keys())  # the suffix, nothing of the local head
    with safe_open(str(tmp_path / "state" / LOCAL_HEAD), "pt") as fh:
        assert fh.metadata()["run"] == "r1" and fh.metadata()["round"] == "1"
    first = load_file(str(tmp_path / "state" / LOCAL_HEAD))
    assert first["0.weight"].shape == sent_back["suffix.head.0.weight"].numpy().shape  # (their own noise: not equal)
    reply = train(2, **{"local-head": 1})
    assert reply["metrics"]["declined"] == 0
    assert not torch.equal(load_file(str(tmp_path / "state" / LOCAL_HEAD))["0.weight"], first["0.weight"])


@pytest.mark.parametrize("kind,blocks", [("none", 0), ("unfreeze", 1)])
def test_a_site_that_personalizes_without_noise_sends_the_update_it_would_send_without_a_local_head(tmp_path, kind,
                                                                                                   blocks):
    """personalize-dp = false (the site's own choice): its local head trains without noise after the round's DP
    step, so it takes no share of the clipping norm — the released update is bit-identical to a site's without a
    local head — and its file says it is not private."""
    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded"})
    base = _model(kind, blocks)
    x = torch.randn(60, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    y = torch.arange(60) % 2
    feats = base.prefix_features(x)
    feats[y == 1] += 0.5
    data = SiteData("st-mary", feats, y, True)
    sent = {}
    for local, personalize_dp in ((False, True), (True, False)):
        model = copy.deepcopy(base)
        policy = _policy(tmp_path / f"{local}", personalize_dp=personalize_dp)
        assert not _round(cfg, model, policy, data, 1, local=local).declined
        sent[local] = model.trainable_state()
    assert all(torch.equal(sent[True][k], sent[False][k]) for k in sent[False])
    path = tmp_path / "True" / "site" / LOCAL_HEAD
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["dp"] == "false"
    head = load_file(str(path))
    assert not torch.equal(head["0.weight"], base.suffix.head[0].weight.detach())  # it trained
    assert torch.isfinite(head["0.weight"]).all()


def test_a_failure_with_the_local_head_after_the_ledger_is_saved_never_costs_the_round(tmp_path, monkeypatch, caplog):
    """The round's ε is spent once its ledger entry is saved: whatever then goes wrong with the local head (here its
    noise-free training raises), the site still sends its update and says why in its log."""
    from fedtl.federation import site as site_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(site_module, "train_local_head", broken)
    cfg = FedTLConfig.from_run_config({"privacy.randomness": "seeded"})
    model = _model()
    x, y = _data()
    policy = _policy(tmp_path, personalize_dp=False)
    before = model.trainable_state()
    with caplog.at_level(logging.ERROR):
        out = _round(cfg, model, policy, SiteData("st-mary", x, y, True), 1)
    assert not out.declined and out.epsilon > 0
    assert len(read_ledger(policy.ledger_path).entries) == 1
    assert any(not torch.equal(before[k], v) for k, v in model.trainable_state().items())  # the update, trained
    assert "could not train or keep its local head" in caplog.text
    assert not (tmp_path / "site" / LOCAL_HEAD).exists()


def test_the_personal_suffix_says_whether_its_local_head_was_trained_with_dp(tmp_path):
    """A site may switch personalize-dp between rounds and the last step: its personal suffix's `dp` follows how
    its local head was trained (the head's own file), not the policy at the last step."""
    cfg = FedTLConfig.from_run_config({"train.lr": 0.5, "privacy.randomness": "seeded"})
    model = _model()
    x, y = _data()
    xv, yv = _data(80, seed=1)
    data = SiteData("st-mary", x, y, True)
    for rnd in (1, 2):
        _round(cfg, model, _policy(tmp_path, personalize_dp=False), data, rnd)
    model.load_trainable_state({k: torch.zeros_like(v) for k, v in model.trainable_state().items()})
    out = personalize_site(cfg, model, data, SiteEvalData("st-mary", {"val": (xv, yv), "test": (xv, yv)}),
                           _policy(tmp_path, personalize_dp=True), run_id="run-1", epochs=2, kind="local-head")
    assert out.kept_tuned
    with safe_open(str(tmp_path / "site" / PERSONAL_SUFFIX), "pt") as fh:
        assert fh.metadata()["dp"] == "false"
