"""The shared checks behind the evaluate and personalize protocols (``CheckedReply``)."""

import math

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtl.federation.fedeval import CheckedReply

KEYS = ("done", "a-n", "a-auc", "a-acc", "a-loss")


def _reply(metrics: dict, info: dict | None = None, **records) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord(info or {"site": "s", "reason": "r"}),
                       **records})


GOOD = {"done": 1, "a-n": 4, "a-auc": -1.0, "a-acc": 0.5, "a-loss": 0.25}


def test_a_reply_in_the_protocol_is_read_with_its_site_and_figures():
    reply = CheckedReply.check(_reply(GOOD), KEYS, ("site", "reason"))
    assert (reply.site, reply.reason) == ("s", "r") and reply.number("done", 0, 1, integer=True) == 1.0
    fig = reply.figures("a", 10, 100.0)
    assert fig["n"] == 4 and math.isnan(fig["auc"]) and fig["acc"] == 0.5 and fig["loss"] == 0.25


@pytest.mark.parametrize("metrics,info,records,kwargs,match", [
    ({**GOOD, "x": 1}, None, {}, {}, r"unexpected: \['x'\]"),
    ({k: v for k, v in GOOD.items() if k != "a-n"}, None, {}, {}, r"missing: \['a-n'\]"),
    (GOOD, {"site": "s", "path": "/etc"}, {}, {}, "info `path`"),
    (GOOD, None, {"other": ConfigRecord({"k": "v"})}, {"info_only": True}, "unexpected config records"),
])
def test_a_reply_outside_the_protocol_is_refused_with_the_reason(metrics, info, records, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckedReply.check(_reply(metrics, info, **records), KEYS, ("site", "reason"), **kwargs)


@pytest.mark.parametrize("changes,match", [
    ({"done": 2}, "`done` must be an integer"), ({"done": 0.5}, "`done` must be an integer"),
    ({"a-n": 11}, r"`a-n` must be an integer in \[0, 10\]"), ({"a-auc": -0.5}, r"-1 \(undefined\)"),
    ({"a-loss": float("inf")}, "`a-loss` must be a number"),
])
def test_each_value_is_range_checked_as_it_is_read(changes, match):
    reply = CheckedReply.check(_reply({**GOOD, **changes}), KEYS, ("site", "reason"))
    with pytest.raises(ValueError, match=match):
        reply.number("done", 0, 1, integer=True)
        reply.figures("a", 10, 100.0)
