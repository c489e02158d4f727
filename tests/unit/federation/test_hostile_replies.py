"""Hostile data sites, as hand-built replies: none can crash a round, none can take over the model."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtl.federation.records import to_record
from fedtl.federation.strategy import AGGREGATIONS, make_strategy

from tests.unit.federation.test_strategy import EXPECTED, task_identity  # noqa: F401

W, B = "suffix.head.0.weight", "suffix.head.0.bias"
GLOBAL = {W: torch.zeros(2, 4), B: torch.zeros(2)}


def _honest(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {W: 0.1 + 0.01 * torch.randn(2, 4, generator=g), B: 0.1 + 0.01 * torch.randn(2, generator=g)}


def _msg(node: int, arrays, metrics: dict, info: dict | None = None) -> Message:
    base = {"num-examples": 64, "declined": 0.0, "epsilon": 1.0, "delta": 1e-5, "target-epsilon": 3.0}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({**base, **metrics}),
                          "info": ConfigRecord(info or {"site": f"s{node}", "reason": "", "accountant": "rdp"})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _round(strategy, hostile: list[Message], honest: int = 9):
    strategy.current = {k: v.numpy() for k, v in GLOBAL.items()}
    replies = [_msg(i, to_record(_honest(i)), {}) for i in range(1, honest + 1)] + hostile
    arrays, _ = strategy.aggregate_train(1, replies)
    return (arrays.to_torch_state_dict() if arrays is not None else None), strategy.rounds[1]


def _clean_mean(honest: int = 9) -> dict:
    states = [_honest(i) for i in range(1, honest + 1)]
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in GLOBAL}


def _fedavg(weighting: str = "examples", weight_cap: float = 4.0):
    return make_strategy("fedavg", EXPECTED, weighting=weighting, weight_cap=weight_cap)


@pytest.mark.parametrize("weighting", ["examples", "sites"])
def test_a_huge_claimed_data_set_buys_no_more_weight_than_an_honest_median_site(weighting):
    """The default (examples, capped at 1 × the median) and ``sites``: claiming 10¹² examples weighs the same
    as telling the median count (64 here)."""
    liar = _msg(66, to_record(_honest(66)), {"num-examples": 1e12})
    honest = _msg(66, to_record(_honest(66)), {"num-examples": 64})
    lied, stats = _round(make_strategy("fedavg", EXPECTED, weighting=weighting), [liar])
    told, _ = _round(make_strategy("fedavg", EXPECTED, weighting=weighting), [honest])
    assert all(torch.equal(lied[k], told[k]) for k in lied)
    ten = [_honest(i) for i in range(1, 10)] + [_honest(66)]
    assert all(torch.allclose(lied[k], torch.stack([s[k] for s in ten]).mean(0)) for k in lied)  # the plain mean
    assert ("s66" in stats.capped) == (weighting == "examples")  # a cap is reported; `sites` has none


def test_a_huge_weight_with_extreme_values_cannot_take_over():
    hostile = _msg(66, to_record({W: torch.full((2, 4), -50.0), B: torch.full((2,), -50.0)}), {"num-examples": 1e12})
    avg, stats = _round(_fedavg(), [hostile])
    clean = _clean_mean()
    assert "capped" in stats.capped["s66"] and "clipped" in stats.bounded["s66"]
    # clipped to 3x the median update norm, weighted at most 4x the median weight: 4/13 of a small step
    assert all((avg[k] - clean[k]).abs().max() < 0.2 for k in avg), avg  # not -50
    assert all(torch.isfinite(v).all() for v in avg.values())


@pytest.mark.parametrize("weighting", ["examples", "sites"])
def test_two_sites_claiming_1e308_do_not_zero_the_model(weighting):
    hostile = [_msg(n, to_record(_honest(n)), {"num-examples": 1e308}) for n in (70, 71)]
    avg, stats = _round(_fedavg(weighting), hostile)
    assert all(torch.isfinite(v).all() and v.abs().min() > 0.05 for v in avg.values())
    assert set(stats.capped) == ({"s70", "s71"} if weighting == "examples" else set())


def test_finite_but_huge_values_are_rejected_before_evaluation():
    hostile = _msg(66, to_record({W: torch.full((2, 4), 3e38), B: torch.full((2,), 3e38)}), {})
    avg, stats = _round(_fedavg(), [hostile])
    assert "more than 1000" in stats.rejected["s66"] and avg is not None
    assert all((avg[k] - _clean_mean()[k]).abs().max() < 1e-6 for k in avg)


@pytest.mark.parametrize("metrics,info,fragment", [
    ({"epsilon": [1.0, 2.0]}, None, "`epsilon` must be a finite number"),
    ({"surprise": 1.0}, None, "unexpected: ['surprise']"),
    ({"num-examples": float("nan")}, None, "`num-examples` must be a finite number"),
    ({"declined": 0.5}, None, "`declined` must be 0 or 1"),
    ({"epsilon": -7.0}, None, "`epsilon` must be >= 0"),
    ({}, {"site": "s66", "reason": "", "accountant": "rdp", "extra": "x"}, "info `extra`"),
])
def test_malformed_metrics_are_a_rejection_not_an_exception(metrics, info, fragment, caplog):
    hostile = _msg(66, to_record(_honest(66)), metrics, info)
    with caplog.at_level(logging.WARNING):
        avg, stats = _round(_fedavg(), [hostile])
    assert fragment in stats.rejected["s66"] and avg is not None
    assert sorted(stats.trained) == [f"s{i}" for i in range(1, 10)]


def test_nan_and_undeserializable_tensors_are_rejected():
    nan = _honest(66)
    nan[B][0] = float("nan")
    broken = ArrayRecord({W: Array(np.zeros((2, 4), dtype=np.float32)), B: Array(dtype="float32", shape=(2,),
                                                                                  stype="numpy.ndarray", data=b"xx")})
    avg, stats = _round(_fedavg(), [_msg(66, to_record(nan), {}), _msg(67, broken, {})])
    assert "NaN" in stats.rejected["s66"] and "s67" in stats.rejected and avg is not None


def test_a_sign_flipped_scaled_update_is_clipped():
    flipped = {k: -100 * v for k, v in _honest(66).items()}
    avg, stats = _round(_fedavg(), [_msg(66, to_record(flipped), {})])
    assert "clipped" in stats.bounded["s66"]
    clean = _clean_mean()
    assert all((avg[k] - clean[k]).abs().max() < 0.1 for k in avg)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_every_flower_aggregation_gets_the_same_validation_and_stays_close(aggregation):
    strategy = make_strategy(aggregation, EXPECTED, max_hostile=1, sites=10)
    hostile = [_msg(66, to_record({W: torch.full((2, 4), -50.0), B: torch.full((2,), -50.0)}), {"num-examples": 1e12}),
               _msg(67, to_record({W: torch.full((2, 4), 3e38), B: torch.full((2,), 3e38)}), {})]
    avg, stats = _round(strategy, hostile)
    assert "s67" in stats.rejected and avg is not None
    assert all((avg[k] - _clean_mean()[k]).abs().max() < 0.2 for k in avg), (aggregation, avg)
