"""The strategy with messages built by hand (as Flower's own mod tests do)."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedtl.federation.records import TRAIN_METRIC_KEYS, to_record, train_reply, validate_update
from fedtl.federation.strategy import SuffixFedAvg


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


EXPECTED = {"suffix.head.0.weight": ((2, 4), "float32"), "suffix.head.0.bias": ((2,), "float32")}


def _state(value: float, weight_shape=(2, 4), dtype=torch.float32):
    return {"suffix.head.0.weight": torch.full(weight_shape, value, dtype=dtype),
            "suffix.head.0.bias": torch.full((2,), value, dtype=dtype)}


def _reply(node: int, state: dict | None, n: int, declined: bool = False, reason: str = "") -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = ArrayRecord() if state is None else to_record(state)
    metrics = {"num-examples": n, "declined": float(declined), "epsilon": 1.0}
    return Message(train_reply(arrays, metrics, site=f"s{node}", reason=reason), reply_to=instruction)


@pytest.mark.parametrize("weighting, weight_cap", [("examples", 0.0), ("examples", 1.0), ("sites", 1.0)])
def test_bad_updates_are_dropped_with_reasons_and_the_rest_averaged_by_weight(caplog, weighting, weight_cap):
    strategy = SuffixFedAvg(expected=EXPECTED, weighting=weighting, weight_cap=weight_cap)
    nan_state = _state(1.0)
    nan_state["suffix.head.0.bias"][0] = float("nan")
    extra = dict(_state(5.0), **{"prefix.stem.0.weight": torch.zeros(3)})
    replies = [
        _reply(1, _state(1.0), 8),  # powers of two: coarse_count leaves them as they are
        _reply(2, _state(4.0), 32),
        _reply(3, _state(9.0, weight_shape=(3, 4)), 50),  # wrong shape
        _reply(4, nan_state, 50),  # NaN
        _reply(5, extra, 50),  # a tensor outside the suffix
        _reply(6, _state(7.0, dtype=torch.float64), 50),  # wrong dtype
        _reply(7, None, 50, declined=True, reason="Site `7` has spent ε=2.98 of its budget 3.0"),
    ]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    avg = arrays.to_torch_state_dict()
    expected = {("examples", 0.0): (1.0 * 8 + 4.0 * 32) / 40,  # FedAvg's weights
                ("examples", 1.0): (1.0 * 8 + 4.0 * 20) / 28,  # the default: 32 capped at the median, 20
                ("sites", 1.0): (1.0 + 4.0) / 2}[weighting, weight_cap]  # one each
    assert torch.allclose(avg["suffix.head.0.weight"], torch.full((2, 4), expected))
    stats = strategy.rounds[1]
    assert sorted(stats.trained) == ["s1", "s2"]
    assert set(stats.rejected) == {"s3", "s4", "s5", "s6"} and set(stats.declined) == {"s7"}
    assert "has shape (3, 4), expected (2, 4)" in stats.rejected["s3"]
    assert "NaN" in stats.rejected["s4"] and "unexpected tensors `prefix.stem.0.weight`" in stats.rejected["s5"]
    assert "dtype float64" in stats.rejected["s6"]
    assert "spent ε=2.98" in caplog.text and "rejected" in caplog.text
    assert stats.bytes_up == 2 * to_record(_state(0.0)).count_bytes()


def test_a_round_with_no_valid_update_keeps_the_model():
    strategy = SuffixFedAvg(expected=EXPECTED)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, _state(1.0, weight_shape=(1, 1)), 10)])
    assert arrays is None and metrics is None


def _hostile_reply(node: int, state: dict, num_examples) -> Message:
    """Built by hand, as a hostile ClientApp would: ``train_reply`` would sanitize the weight."""
    metrics = {"declined": 0.0, "epsilon": 1.0, "delta": 1e-5, "target-epsilon": 3.0}
    if num_examples is not _MISSING:
        metrics["num-examples"] = num_examples
    content = RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics),
                          "info": ConfigRecord({"site": f"s{node}", "reason": ""})})
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


_MISSING = object()
BAD_WEIGHTS = [0, -3, float("nan"), float("inf"), _MISSING]


@pytest.mark.parametrize("num_examples", BAD_WEIGHTS, ids=["zero", "negative", "nan", "inf", "missing"])
def test_an_update_with_a_bad_weight_is_rejected_and_left_out_of_the_average(num_examples):
    content = _hostile_reply(9, _state(1.0), num_examples).content
    assert any("`num-examples` must be a positive number" in p for p in validate_update(content, EXPECTED))
    strategy = SuffixFedAvg(expected=EXPECTED)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _state(1.0), 8), _reply(2, _state(4.0), 32),
                                             _hostile_reply(9, _state(1000.0), num_examples)])
    avg = arrays.to_torch_state_dict()
    expected = (1.0 * 8 + 4.0 * 20) / 28  # 32 capped at the median (20); the hostile reply has no part in it
    assert torch.allclose(avg["suffix.head.0.weight"], torch.full((2, 4), expected))
    assert torch.allclose(avg["suffix.head.0.bias"], torch.full((2,), expected))
    stats = strategy.rounds[1]
    assert sorted(stats.trained) == ["s1", "s2"] and list(stats.rejected) == ["s9"]
    assert "num-examples" in stats.rejected["s9"]


@pytest.mark.parametrize("num_examples", [1, 3, 2.5, 10_000])
def test_a_positive_finite_weight_is_accepted(num_examples):
    assert validate_update(_hostile_reply(9, _state(1.0), num_examples).content, EXPECTED) == []


def _error_reply(node: int, reason: str) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(error=Error(code=0, reason=reason), reply_to=instruction)


def test_a_failed_node_is_recorded_with_its_reason_and_the_round_goes_on(caplog):
    strategy = SuffixFedAvg(expected=EXPECTED)
    with caplog.at_level(logging.WARNING, logger="fedtl.federation.strategy"):
        arrays, _ = strategy.aggregate_train(3, [_error_reply(9, "ClientApp crashed"), _reply(1, _state(2.0), 10)])
    assert torch.equal(arrays.to_torch_state_dict()["suffix.head.0.weight"], torch.full((2, 4), 2.0))
    stats = strategy.rounds[3]
    assert stats.failed == {"node-9": "ClientApp crashed"} and stats.trained == ["s1"]
    assert "Round 3: node 9 failed: ClientApp crashed" in caplog.text


def test_what_a_round_records_about_each_site():
    strategy = SuffixFedAvg(expected=EXPECTED)
    unnamed = Message(train_reply(to_record(_state(3.0)), {"num-examples": 5, "epsilon": 0.0, "delta": 1e-5,
                                                          "target-epsilon": 3.0}, accountant="rdp"),
                      reply_to=Message(content=RecordDict(), dst_node_id=4, message_type=MessageType.TRAIN))
    nameless_decline = Message(train_reply(ArrayRecord(), {"declined": 1.0, "epsilon": 2.9}),
                               reply_to=Message(content=RecordDict(), dst_node_id=6, message_type=MessageType.TRAIN))
    unknown_eps = Message(train_reply(to_record(_state(1.0)), {"num-examples": 5, "epsilon": -1.0}, site="cold"),
                          reply_to=Message(content=RecordDict(), dst_node_id=8, message_type=MessageType.TRAIN))
    strategy.aggregate_train(1, [unnamed, nameless_decline, unknown_eps])
    stats = strategy.rounds[1]
    # A site without a name is known by its node; ε = 0 is a figure, ε = -1 (unknown) is not.
    assert stats.trained == ["node-4", "cold"] and stats.epsilon == {"node-4": 0.0, "node-6": 2.9}
    assert stats.declined == {"node-6": "declined"}  # no reason given: still a reason
    assert stats.privacy["node-4"] == {"epsilon": 0.0, "delta": 1e-5, "accountant": "rdp", "budget": 3.0}
    assert stats.bytes_up == 2 * to_record(_state(0.0)).count_bytes()


def test_the_server_evaluates_centrally_unless_told_otherwise():
    assert SuffixFedAvg(expected=EXPECTED).fraction_evaluate == 0.0
    assert SuffixFedAvg(expected=EXPECTED, fraction_evaluate=0.5).fraction_evaluate == 0.5


def test_train_reply_has_fixed_keys_and_sanitizes_values():
    content = train_reply(to_record(_state(1.0)), {"num-examples": 12.7, "epsilon": float("nan"),
                                                   "delta": float("inf")}, site="s", reason="r", accountant="prv")
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    metrics = dict(content["metrics"])
    assert set(metrics) == set(TRAIN_METRIC_KEYS)
    assert metrics["num-examples"] == 11 and isinstance(metrics["num-examples"], int)  # 12 to a quarter-octave
    assert metrics["epsilon"] == -1.0 and metrics["delta"] == -1.0  # non-finite becomes "unknown"
    assert metrics["declined"] == 0.0 and metrics["target-epsilon"] == 0.0  # absent keys are 0
    assert dict(content["info"]) == {"site": "s", "reason": "r", "accountant": "prv"}


def test_an_undeserializable_tensor_is_one_problem_not_a_cascade():
    content = train_reply(to_record(_state(1.0)), {"num-examples": 3})
    content["arrays"]["suffix.head.0.bias"].data = b"not a numpy file"
    problems = validate_update(content, EXPECTED)
    assert len(problems) == 1 and problems[0].startswith("`suffix.head.0.bias` cannot be deserialized")


def _bare_reply(node: int, metrics: dict, state: dict | None = None, info: dict | None = None) -> Message:
    """A reply with only what a (non-fedtl) ClientApp might send: no info record, few metric keys."""
    records = {"arrays": to_record(state) if state is not None else ArrayRecord(), "metrics": MetricRecord(metrics)}
    if info is not None:
        records["info"] = ConfigRecord(info)
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict(records), reply_to=instruction)


def test_a_reply_outside_the_protocol_is_rejected_not_guessed():
    strategy = SuffixFedAvg(expected=EXPECTED)
    arrays, _ = strategy.aggregate_train(1, [_bare_reply(4, {"num-examples": 5}, _state(2.0)),
                                             _bare_reply(6, {"declined": 1.0}, info={"site": "quiet"}),
                                             _reply(1, _state(1.0), 8)])
    stats = strategy.rounds[1]
    assert stats.trained == ["s1"] and set(stats.rejected) == {"node-4", "quiet"}
    assert "missing: ['declined', 'delta', 'epsilon', 'target-epsilon']" in stats.rejected["node-4"]
    assert stats.epsilon == {"s1": 1.0}
    assert torch.equal(arrays.to_torch_state_dict()["suffix.head.0.bias"], torch.full((2,), 1.0))


def test_every_problem_of_a_rejected_update_is_named():
    content = train_reply(to_record(_state(1.0)), {"num-examples": 3})
    content["metrics"]["num-examples"] = -3
    content["arrays"]["suffix.head.0.bias"].data = b"garbage"
    strategy = SuffixFedAvg(expected=EXPECTED)
    strategy.aggregate_train(1, [Message(content, reply_to=Message(content=RecordDict(), dst_node_id=2,
                                                                   message_type=MessageType.TRAIN))])
    reason = strategy.rounds[1].rejected["node-2"]
    assert reason.startswith("`num-examples` must be a positive number, got -3; `suffix.head.0.bias` cannot be deserialized")
