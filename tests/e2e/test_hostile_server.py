"""A hostile server against the real ClientApp of a deployed data site (site.toml, real backbone).

Each test hand-builds Flower messages — a run config and train / query messages — as a server that
wants more than the site's policy allows would, and calls the ClientApp exactly as a SuperNode
does. After each, the site's ε recomputed *independently* from its ledger with Opacus' own RDP
and PRV accountants must be ≥ every ε the site reported and ≤ its budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtl.config import FedTLConfig
from fedtl.federation.apps import make_client_app
from fedtl.federation.records import to_record, to_state
from fedtl.federation.site import build_transfer_model
from fedtl.privacy import read_ledger
from fedtl.privacy.accounting import make_accountant
from tests.conftest import write_small_medmnist

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUDGET, DELTA, ROUND_CAP = 3.0, 1e-5, 0.75  # the site's own policy (per-round cap: a quarter of the budget)
APP = make_client_app()  # the module-level ClientApp a SuperNode runs (reads the run config)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("images")
    return {seed: write_small_medmnist(base / f"{seed}.npz", n_train=96, n_val=8, n_test=8, seed=seed) for seed in (1, 2)}


@pytest.fixture(scope="module")
def initial() -> ArrayRecord:
    torch.manual_seed(0)
    return to_record(build_transfer_model(FedTLConfig(), 2).trainable_state())


class Site:
    def __init__(self, folder: Path, data: Path, **privacy) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.state = folder / "state"
        self.toml = folder / "site.toml"
        body = {"name": "st-mary", "state-dir": str(self.state),
                "data": {"format": "medmnist", "path": str(data), "image-size": 28},
                "privacy": {"target-epsilon": BUDGET, "delta": DELTA, **privacy}}
        self.toml.write_text(tomli_w.dumps(body))
        self.reported: list[float] = []

    @property
    def ledger(self) -> Path:
        return self.state / "privacy-ledger.json"

    def train(self, arrays: ArrayRecord, *, rnd: int = 1, total: int = 10, run: str = "run-1", run_config=None,
              **config) -> Message:
        run_cfg = FedTLConfig().to_run_config()
        run_cfg.update(run_config or {})
        ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(self.toml)}, state=RecordDict(),
                      run_config=run_cfg)
        body = {"server-round": rnd, "total-rounds": total, "run-id": run, "num-classes": 2, **config}
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(body)}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        reply = APP(msg, ctx)
        assert not reply.has_error(), reply.error
        m = reply.content["metrics"]
        if m["epsilon"] >= 0:
            self.reported.append(float(m["epsilon"]))
        return reply

    def check_ledger(self) -> dict:
        """ε recomputed from the ledger with Opacus' accountants: ≥ every reported ε, ≤ the budget."""
        if not self.ledger.exists():
            assert all(e == 0 for e in self.reported)
            return {"rdp": 0.0, "prv": 0.0}
        history = read_ledger(self.ledger).history
        rdp = make_accountant("rdp", history).get_epsilon(DELTA)
        prv = make_accountant("prv", history).get_epsilon(DELTA)
        assert all(e <= rdp + 1e-9 for e in self.reported), (self.reported, rdp)
        assert rdp <= BUDGET + 1e-9 and prv <= BUDGET + 1e-9
        return {"rdp": rdp, "prv": prv}


def _update(reply: Message, arrays: ArrayRecord) -> torch.Tensor:
    a, b = to_state(reply.content["arrays"]), to_state(arrays)
    return torch.cat([(a[k] - b[k]).flatten() for k in b])


def _metrics(reply: Message) -> dict:
    return dict(reply.content["metrics"])


def test_turning_dp_off_from_the_run_has_no_effect(tmp_path, images, initial, caplog):
    site = Site(tmp_path, images[1])
    with caplog.at_level(logging.WARNING):
        reply = site.train(initial, run_config={"privacy.enabled": False})
    m = _metrics(reply)
    assert m["declined"] == 0 and 0 < m["epsilon"] <= ROUND_CAP
    assert "ignores the run's privacy settings" in caplog.text and "privacy.enabled=False" in caplog.text
    entries = read_ledger(site.ledger).entries
    assert len(entries) == 1 and entries[0]["noise_multiplier"] > 0.5  # trained with real noise, and recorded
    site.check_ledger()


def test_choosing_the_gdp_accountant_is_refused(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    reply = site.train(initial, run_config={"privacy.accountant": "gdp"})
    assert _metrics(reply)["declined"] == 1 and "privacy.accountant" in reply.content["info"]["reason"]
    assert not site.ledger.exists() and len(reply.content["arrays"]) == 0
    site.check_ledger()


def test_raising_epsilon_or_delta_from_the_run_has_no_effect(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    reply = site.train(initial, total=1, run_config={"privacy.target-epsilon": 100.0, "privacy.delta": 0.5,
                                                     "privacy.max-epsilon-per-round": 100.0,
                                                     "privacy.max-noise-multiplier": 1e3})
    m = _metrics(reply)
    assert m["target-epsilon"] == BUDGET and m["delta"] == DELTA and reply.content["info"]["accountant"] == "rdp"
    assert 0 < m["epsilon"] <= ROUND_CAP
    ledger = json.loads(site.ledger.read_text())
    assert ledger["delta"] == DELTA and ledger["target_epsilon"] == BUDGET
    site.check_ledger()


def test_more_rounds_than_the_policy_allows_are_declined(tmp_path, images, initial):
    site = Site(tmp_path, images[1], **{"max-rounds-per-run": 2})
    replies = [site.train(initial, rnd=r, total=50) for r in (1, 2, 3)]
    assert [_metrics(r)["declined"] for r in replies] == [0, 0, 1]
    assert "max-rounds-per-run = 2" in replies[2].content["info"]["reason"]
    assert [e["round"] for e in read_ledger(site.ledger).entries] == [1, 2]
    # calibrated for the 2 rounds it will serve, not the 50 asked for: its budget is not wasted on noise
    assert site.check_ledger()["rdp"] > 1.0


def test_a_noise_multiplier_below_what_the_budget_needs_is_raised(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    reply = site.train(initial, total=10, **{"noise-multiplier": 0.01})
    assert _metrics(reply)["declined"] == 0
    sigma = read_ledger(site.ledger).entries[0]["noise_multiplier"]
    assert sigma > 0.5  # the site's own calibration, not the server's 0.01
    site.check_ledger()


def test_spending_the_whole_budget_in_round_one_is_capped(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    reply = site.train(initial, total=1)
    assert _metrics(reply)["declined"] == 0
    assert site.check_ledger()["rdp"] <= ROUND_CAP + 1e-9


def test_setting_the_seed_does_not_make_the_noise_predictable(tmp_path, images, initial):
    hostile = {"train.seed": 123, "privacy.randomness": "seeded"}
    a = Site(tmp_path / "a", images[1])
    b = Site(tmp_path / "b", images[1])  # a copy of the same site: same data, same request, same seed
    ua = _update(a.train(initial, run_config=hostile), initial)
    ub = _update(b.train(initial, run_config=hostile), initial)
    assert not torch.equal(ua, ub)
    a.check_ledger()
    b.check_ledger()


def test_two_sites_of_equal_size_with_different_data_draw_different_noise(tmp_path, images, initial):
    a = Site(tmp_path / "a", images[1])
    b = Site(tmp_path / "b", images[2])
    ra, rb = a.train(initial), b.train(initial)
    assert _metrics(ra)["num-examples"] == _metrics(rb)["num-examples"]
    assert not torch.equal(_update(ra, initial), _update(rb, initial))


def test_labels_outside_the_classes_and_malformed_requests_are_refused(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    for config in ({"num-classes": 1}, {"num-classes": 0}, {"server-round": 0}, {"total-rounds": float("nan")},
                   {"noise-multiplier": float("inf")}, {"backbone-sha256": "../../etc/passwd"}, {"pooling": "max"},
                   {"pooling": "avg-std-grid"}, {"head": "auto"}, {"head": 3},
                   {"head": "ordinal"}):  # a valid pooling or head whose model is not the suffix sent
        reply = site.train(initial, **config)
        assert _metrics(reply)["declined"] == 1, config
        assert len(reply.content["arrays"]) == 0
    bad = ArrayRecord({"suffix.head.0.weight": Array(np.zeros((5, 5), dtype=np.float32))})
    assert _metrics(site.train(bad))["declined"] == 1
    assert not site.ledger.exists()


def test_a_wrong_hash_backbone_payload_is_refused(tmp_path, images):
    site = Site(tmp_path, images[1])
    payload = np.frombuffer(b"not the weights", dtype=np.uint8)
    config = ConfigRecord({"action": "backbone-install", "backbone": "efficientnet_lite0",
                           "sha256": hashlib.sha256(b"something else").hexdigest()})
    msg = Message(RecordDict({"config": config, "weights": ArrayRecord({"file": Array(payload)})}), dst_node_id=1,
                  message_type=MessageType.QUERY)
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(site.toml)}, state=RecordDict(),
                  run_config=FedTLConfig().to_run_config())
    reply = make_client_app()(msg, ctx)
    status = reply.content["status"]
    assert status["has"] is False and "refusing" in status["error"]
    weights = site.state / "weights"
    assert not weights.exists() or not any(weights.iterdir())


def test_a_deleted_or_edited_ledger_makes_the_site_refuse(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    assert _metrics(site.train(initial, rnd=1))["declined"] == 0
    raw = json.loads(site.ledger.read_text())
    raw["entries"][0]["steps"] = 0
    site.ledger.write_text(json.dumps(raw))
    edited = site.train(initial, rnd=2)
    assert _metrics(edited)["declined"] == 1
    reason = edited.content["info"]["reason"]
    assert "cannot use its privacy ledger" in reason and str(tmp_path) not in reason  # no local path leaves
    site.ledger.unlink()
    assert _metrics(site.train(initial, rnd=2))["declined"] == 1
    assert not site.ledger.exists()


def test_only_what_the_policy_allows_leaves_the_site(tmp_path, images, initial):
    site = Site(tmp_path, images[1])
    reply = site.train(initial)
    assert set(reply.content["metrics"]) == {"num-examples", "declined", "epsilon", "delta", "target-epsilon"}
    assert set(reply.content["info"]) == {"site", "reason", "accountant"}
    n = reply.content["metrics"]["num-examples"]
    assert n != 96 and abs(n - 96) / 96 < 0.1  # a coarsened weight, not the exact count
    assert math.isfinite(reply.content["metrics"]["epsilon"])


def _evaluate(site: Site, arrays: ArrayRecord, evaluation: dict | None, **config) -> Message:
    if evaluation is not None:
        body = {"name": "st-mary", "state-dir": str(site.state),
                "data": {"format": "medmnist", "path": str(site.data), "image-size": 28},
                "evaluation": evaluation, "privacy": {"target-epsilon": BUDGET, "delta": DELTA}}
        site.toml.write_text(tomli_w.dumps(body))
    from fedtl.federation.deployment import load_site_config

    load_site_config.cache_clear()
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(site.toml)}, state=RecordDict(),
                  run_config=FedTLConfig().to_run_config())
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "num-classes": 2, **config})}),
                  dst_node_id=1, message_type=MessageType.EVALUATE)
    reply = APP(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply


def test_evaluation_requests_get_only_the_sites_released_figures_and_spend_nothing(tmp_path, images, initial):
    """A server asks for evaluation: a site without [evaluation] sends no figures; with a hold-out it sends
    exactly the protocol's figures for its held-out images; malformed requests or suffixes are refused
    with a reason and never crash it; nothing is ever written to the privacy ledger."""
    from fedtl.federation.fedeval import EVAL_METRIC_KEYS, parse_eval_reply

    site = Site(tmp_path, images[1])
    site.data = images[1]
    reply = _evaluate(site, initial, None)  # no [evaluation] table: the site does not evaluate
    assert parse_eval_reply(reply.content, 2)[1] is None and "does not evaluate" in reply.content["info"]["reason"]
    reply = _evaluate(site, initial, {"holdout": 0.25})
    assert set(reply.content["metrics"].keys()) == set(EVAL_METRIC_KEYS)
    name, figs, _ = parse_eval_reply(reply.content, 2)
    assert name == "st-mary" and figs["val"]["n"] + figs["test"]["n"] == 24  # a quarter of its 96 images
    assert set(reply.content.array_records) == set()  # nothing but figures leaves the site
    bad_suffix = ArrayRecord({k: Array(np.zeros((3, 3), dtype=np.float32)) for k in initial})
    for arrays, config, reason in ((bad_suffix, {}, "do not match"), (initial, {"num-classes": 1}, "invalid"),
                                   (initial, {"server-round": -5}, "invalid"),
                                   (initial, {"backbone-sha256": "0" * 64}, "other backbone")):
        reply = _evaluate(site, arrays, None, **config)
        assert parse_eval_reply(reply.content, 2)[1] is None and reason in reply.content["info"]["reason"], reason
    assert not site.ledger.exists()  # evaluation never touches the privacy ledger


def _personalize(site: Site, arrays: ArrayRecord, **config) -> Message:
    from fedtl.federation.deployment import load_site_config

    load_site_config.cache_clear()
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(site.toml)}, state=RecordDict(),
                  run_config=FedTLConfig().to_run_config())
    body = {"run-id": "run-1", "epochs": 2, "num-classes": 2, **config}
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(body)}), dst_node_id=1,
                  message_type=f"{MessageType.TRAIN}.personalize")
    reply = APP(msg, ctx)
    assert not reply.has_error(), reply.error
    assert len(reply.content.array_records) == 0  # a personal suffix never leaves the site
    return reply


def test_personalization_is_refused_when_hostile_and_otherwise_kept_at_the_site_within_budget(tmp_path, images, initial):
    """The server asks for local fine-tuning after two rounds (reserved from round 1): hostile requests (bad or
    huge epochs, a wrong suffix, no run id) are refused with a reason and spend nothing; a valid one fine-tunes
    under the site's budget, saves the personal suffix in the state dir and replies with figures only."""
    from fedtl.federation.personalize import PERSONAL_METRIC_KEYS, parse_personal_reply

    site = Site(tmp_path, images[1])
    body = {"name": "st-mary", "state-dir": str(site.state),
            "data": {"format": "medmnist", "path": str(images[1]), "image-size": 28},
            "evaluation": {"holdout": 0.25}, "privacy": {"target-epsilon": BUDGET, "delta": DELTA}}
    site.toml.write_text(tomli_w.dumps(body))
    arrays = initial
    for rnd in (1, 2):
        reply = site.train(arrays, rnd=rnd, total=2, **{"personalize-epochs": 2})
        arrays = reply.content["arrays"]
    entries = len(read_ledger(site.ledger).entries)
    bad_suffix = ArrayRecord({k: Array(np.zeros((3, 3), dtype=np.float32)) for k in initial})
    for suffix, config, reason in ((arrays, {"epochs": 0}, "invalid"), (arrays, {"epochs": 1e12}, "invalid"),
                                   (arrays, {"epochs": "2"}, "invalid"), (arrays, {"run-id": ""}, "invalid"),
                                   (arrays, {"num-classes": 1}, "invalid"), (bad_suffix, {}, "do not match")):
        reply = _personalize(site, suffix, **config)
        _, parsed, why = parse_personal_reply(reply.content)
        assert not parsed["personalized"] and reason in why, (config, why)
    assert len(read_ledger(site.ledger).entries) == entries and not (site.state / "personal-suffix.safetensors").exists()
    reply = _personalize(site, arrays)
    assert set(reply.content["metrics"].keys()) == set(PERSONAL_METRIC_KEYS)
    name, parsed, why = parse_personal_reply(reply.content)
    assert name == "st-mary" and parsed["personalized"], why
    assert parsed["global_test"]["n"] + parsed["global_val"]["n"] == 24  # its hold-out: a quarter of 96 images
    site.reported.append(parsed["epsilon"])
    eps = site.check_ledger()  # recomputed from the ledger, fine-tuning included: ≤ budget, ≥ what was reported
    assert read_ledger(site.ledger).entries[-1]["kind"] == "personalize" and eps["rdp"] <= BUDGET
    assert (site.state / "personal-suffix.safetensors").is_file()
    _, again, why = parse_personal_reply(_personalize(site, arrays).content)  # twice: nothing spent again
    assert not again["personalized"] and "already" in why and len(read_ledger(site.ledger).entries) == entries + 1


def test_a_servers_feature_statistics_are_checked_and_cannot_raise_the_spend(tmp_path, images, initial):
    """The statistics a server sends for standardized training (``train.standardize``) are untrusted input.
    Malformed ones (one without the other, NaN, a scale of zero, the wrong width) are refused before anything is
    spent, as are scales outside [1e-6, 1e6] (with them the head written in standardized coordinates, or back, could
    overflow); valid but hostile ones (the extreme scale and mean) change only what the update looks like: it stays
    finite and the site's ε stays what its ledger says (recomputed)."""
    site = Site(tmp_path, images[1])
    width = int(initial["suffix.head.0.weight"].numpy().shape[1])
    for bad in ({"feature-mean": [0.0] * width},
                {"feature-mean": [float("nan")] * width, "feature-scale": [1.0] * width},
                {"feature-mean": [0.0] * width, "feature-scale": [0.0] * width},
                {"feature-mean": [0.0] * width, "feature-scale": [1e-300] * width},
                {"feature-mean": [0.0] * (width - 1), "feature-scale": [1.0] * (width - 1)}):
        reply = site.train(initial, **bad)
        assert _metrics(reply)["declined"] == 1 and len(reply.content["arrays"]) == 0
        assert "invalid train request" in reply.content["info"]["reason"], reply.content["info"]["reason"]
    assert not site.ledger.exists()
    reply = site.train(initial, **{"feature-mean": [1e6] * width, "feature-scale": [1e-6] * width})  # the extremes
    assert _metrics(reply)["declined"] == 0
    assert torch.isfinite(_update(reply, initial)).all()
    assert site.check_ledger()["rdp"] > 0
