"""The round loop never waits without bound: a quorum that cannot be met stops the run, resumably."""


import pytest
from flwr.app import ConfigRecord

from fedtl.config import FederationConfig
from fedtl.errors import FederationError
from fedtl.federation import server
from fedtl.federation.records import to_record
from fedtl.federation.strategy import SuffixFedAvg

from tests.unit.federation.test_strategy import EXPECTED, _reply, _state, task_identity  # noqa: F401


class FakeGrid:
    """Nodes 1..n connected; only ``answering`` nodes reply."""

    def __init__(self, n: int, answering: set[int]) -> None:
        self.n, self.answering, self.sent = n, answering, []

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.append(len(messages))
        self.pending = {f"msg-{m.metadata.dst_node_id}": m.metadata.dst_node_id for m in messages}
        self.pulls = 0
        return list(self.pending)

    def pull_messages(self, message_ids):
        self.pulls += 1
        replies = []
        for mid in message_ids:
            node = self.pending[mid]
            if node in self.answering:
                reply = _reply(node, _state(1.0), 8)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                replies.append(reply)
        return replies


def _round(grid, fed, tmp_path):
    strategy = SuffixFedAvg(expected=EXPECTED, min_available_nodes=fed.min_sites, min_train_nodes=fed.min_sites)
    return strategy, server._train_round(grid, strategy, 3, to_record(_state(0.0)), ConfigRecord({}), fed, tmp_path)


def test_a_round_with_its_quorum_goes_on_and_names_the_silent_sites(tmp_path):
    fed = FederationConfig(sites=3, min_sites=2, round_timeout=0.2, round_retries=1)
    strategy, replies = _round(FakeGrid(3, {1, 2}), fed, tmp_path)
    assert len(replies) == 2 and strategy.rounds[3].timed_out == ["node-3"] and strategy.rounds[3].attempts == 1


def test_a_quorum_that_cannot_be_met_is_retried_then_stops_the_run_with_how_to_resume(tmp_path):
    fed = FederationConfig(sites=3, min_sites=3, round_timeout=0.2, round_retries=2)
    grid = FakeGrid(3, {1})
    with pytest.raises(FederationError) as err:
        _round(grid, fed, tmp_path)
    assert grid.sent == [3, 3, 3]  # 1 try + 2 retries, each bounded by the round timeout (0.2 s)
    assert 1 < grid.pulls <= 3  # replies polled every 0.2 s at most, not Flower's 3 s
    msg = str(err.value)
    assert "Round 3: fewer than 3 site(s) (federation.min-sites) replied within 0 s in 3 attempt(s)" in msg
    assert "stopped after round 2" in msg and f"fedtl simulate --resume {tmp_path}" in msg


def test_too_few_connected_sites_is_bounded_too(tmp_path):
    fed = FederationConfig(sites=3, min_sites=3, round_timeout=0.2, round_retries=0)
    grid = FakeGrid(2, {1, 2})
    with pytest.raises(FederationError, match="fewer than 3 site"):
        _round(grid, fed, tmp_path)
    assert grid.sent == []  # nothing sent while the quorum could not even connect


def test_federation_settings_are_validated():
    with pytest.raises(Exception, match="federation.min-sites"):
        FederationConfig(sites=2, min_sites=3)
    with pytest.raises(Exception, match="federation.round-timeout"):
        FederationConfig(round_timeout=0)


def test_replies_are_collected_as_soon_as_they_arrive(tmp_path):
    """Every reply in: the round returns at once, without waiting out the poll interval or the timeout."""
    import time

    fed = FederationConfig(sites=3, min_sites=3, round_timeout=60, round_retries=0)
    grid = FakeGrid(3, {1, 2, 3})
    t0 = time.monotonic()
    _, replies = _round(grid, fed, tmp_path)
    assert len(replies) == 3 and grid.pulls == 1 and time.monotonic() - t0 < 5


def test_a_site_that_is_not_connected_is_named_and_the_wait_for_it_is_said(tmp_path, monkeypatch, caplog):
    """A trial killed a site and resumed the server: each round then waited out federation.round-timeout for it in
    silence (over a minute), and the round's records did not say it was missing (neither timed out nor failed)."""
    import logging

    monkeypatch.setattr(server, "WAIT_NOTICE_S", 0.05)
    fed = FederationConfig(sites=3, min_sites=2, round_timeout=1.2, round_retries=0)
    strategy = SuffixFedAvg(expected=EXPECTED, min_available_nodes=2, min_train_nodes=2)
    strategy.node_sites.update({1: "site-a", 2: "site-b", 3: "site-c"})  # all three trained an earlier round
    with caplog.at_level(logging.INFO, logger="fedtl.federation.server"):
        replies = server._train_round(FakeGrid(2, {1, 2}), strategy, 5, to_record(_state(0.0)), ConfigRecord({}),
                                      fed, tmp_path)
    assert len(replies) == 2 and strategy.rounds[5].not_connected == ["site-c"] and strategy.rounds[5].timed_out == []
    text = caplog.text
    assert "Round 5: 2 of 3 sites connected; waiting up to" in text and "(federation.round-timeout)" in text
    assert "Round 5: going ahead with 2 of 3 sites after waiting 1 s" in text and "(not connected: site-c)" in text
