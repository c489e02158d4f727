"""The strategy with messages built by hand (as Flower's own mod tests do)."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtl.federation.records import to_record, train_reply, validate_update
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


def test_bad_updates_are_dropped_with_reasons_and_the_rest_averaged_by_weight(caplog):
    strategy = SuffixFedAvg(expected=EXPECTED)
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
    assert torch.allclose(avg["suffix.head.0.weight"], torch.full((2, 4), (1.0 * 8 + 4.0 * 32) / 40))
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
    expected = (1.0 * 8 + 4.0 * 32) / 40  # the hostile reply's 1000s and weight have no part in it
    assert torch.allclose(avg["suffix.head.0.weight"], torch.full((2, 4), expected))
    assert torch.allclose(avg["suffix.head.0.bias"], torch.full((2,), expected))
    stats = strategy.rounds[1]
    assert sorted(stats.trained) == ["s1", "s2"] and list(stats.rejected) == ["s9"]
    assert "num-examples" in stats.rejected["s9"]


@pytest.mark.parametrize("num_examples", [1, 3, 2.5, 10_000])
def test_a_positive_finite_weight_is_accepted(num_examples):
    assert validate_update(_hostile_reply(9, _state(1.0), num_examples).content, EXPECTED) == []
