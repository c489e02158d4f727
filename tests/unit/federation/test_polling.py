"""Collecting a round's replies: a reply that can never be downloaded must not hold the others."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from fedtl.federation.polling import send_and_receive


def _reply(message_id: str, error: bool = False):
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id), error=error)


class StuckGrid:
    """Three sites; site c was killed while uploading its reply. The SuperLink hands each reply to one pull only;
    the pull that gets c's blocks (Flower retries the missing object for up to two hours) and ends in an error.
    a's and b's replies arrive 0.3 s after the request, while that pull is stuck."""

    pull_interval = 0.05

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.claimed: set[str] = set()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def push_messages(self, messages):
        self.start = time.monotonic()
        return ["a", "b", "c"]

    def pull_messages(self, ids):
        with self.lock:
            ready = {"c"} | ({"a", "b"} if time.monotonic() - self.start > 0.3 else set())
            take = (set(ids) & ready) - self.claimed
            self.claimed |= take
        got = [_reply(i) for i in sorted(take - {"c"})]
        if "c" in take:
            self.release.wait(20)
            got.append(_reply("c", error=True))
        return got


def test_a_reply_that_cannot_be_downloaded_does_not_hold_the_others():
    """A deployment trial: one site killed mid-upload, and the round waited its whole timeout and counted none of
    the three replies, because one pull held them all behind the dead site's."""
    grid = StuckGrid()
    t0 = time.monotonic()
    try:
        replies = send_and_receive(grid, [], timeout=5.0)
    finally:
        grid.release.set()
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert time.monotonic() - t0 < 5.5  # the deadline held; the stuck pull was left behind


class QuickGrid:
    pull_interval = 0.05

    def __init__(self, fail: bool = False) -> None:
        self.pulls, self.fail = 0, fail

    def push_messages(self, messages):
        return ["a", "b"]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.fail:
            raise RuntimeError("SuperLink gone")
        return [_reply(i) for i in sorted(ids)] if self.pulls >= 3 else []


def test_replies_are_polled_until_all_came_and_a_failing_pull_is_raised():
    grid = QuickGrid()
    replies = send_and_receive(grid, [], timeout=5.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"] and grid.pulls == 3
    with pytest.raises(RuntimeError, match="SuperLink gone"):
        send_and_receive(QuickGrid(fail=True), [], timeout=5.0)
