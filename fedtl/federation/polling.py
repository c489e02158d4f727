"""Sending a round's messages and collecting the replies, polled at a short interval.

Flower 1.41's deployment grid (``flwr.superlink.grid.http_grid``) polls the SuperLink for replies every
3 s in ``send_and_receive``, so every round ends up to 3 s after its last reply arrived; a pull of a few
message ids costs the SuperLink one small request. This is the same push-then-pull loop through the
grid's public ``push_messages`` / ``pull_messages``, polled every ``interval`` seconds (the simulation's
in-memory grid keeps its own, shorter, ``pull_interval``).

A pull may hang: ``HttpGrid.pull_messages`` downloads each reply's objects before it returns, retrying an object
that is not there yet for up to two hours (Flower's ``PULL_MAX_TIME``), and a site killed while it was uploading
its reply leaves such an object (the SuperLink gave up on it after about three minutes in a deployment trial, whose
round meanwhile waited out its timeout and counted none of the replies that had arrived). So each pull runs in a
thread of its own: one that has not returned within :data:`STALLED_PULL_S` is left to finish (what it brings before
the deadline still counts) while new pulls collect the other replies — the SuperLink hands each reply to one pull
only, so the stuck one is not asked for again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

REPLY_POLL_INTERVAL_S = 0.2
STALLED_PULL_S = 2.0  # a pull still running after this long is left to finish while new pulls go on


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float,
                     interval: float = REPLY_POLL_INTERVAL_S, stalled: float = STALLED_PULL_S) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds (all of them, or fewer)."""
    interval = min(interval, float(getattr(grid, "pull_interval", interval)))
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    arrived: queue.Queue = queue.Queue()  # (pull's token, its messages or the exception it raised)
    running: dict[int, float] = {}  # token -> when the pull started

    def pull(token: int, ids: set[str]) -> None:
        try:
            arrived.put((token, list(grid.pull_messages(ids))))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            arrived.put((token, exc))

    token, next_pull, last = 0, time.monotonic(), False
    while pending:
        now = time.monotonic()
        fresh = [started for started in running.values() if now - started < stalled]
        if not fresh and now >= next_pull:  # none running, or every running pull stuck: a new one
            if last:  # the pull at the deadline came back (or is stuck too): done
                break
            last = now >= deadline  # the last pull, at the deadline: replies that came in its final interval count
            token += 1
            running[token] = now
            fresh = [now]
            threading.Thread(target=pull, args=(token, set(pending)), name="reply-pull", daemon=True).start()
        # wake for a pull's result, when the running pull counts as stuck, or for the next poll
        wake = max(fresh) + stalled if fresh else next_pull
        try:
            done, got = arrived.get(timeout=max(0.0, wake - now))
        except queue.Empty:
            continue
        running.pop(done, None)
        if isinstance(got, BaseException):
            raise got
        for m in got:
            if m.metadata.reply_to_message_id in pending:
                replies.append(m)
                pending.discard(m.metadata.reply_to_message_id)
        next_pull = min(time.monotonic() + interval, deadline)
    return replies


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id → destination node of pushed ``messages`` (a grid sets each id when it pushes the message)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def reply_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply is about: the destination of the message it answers. An error the SuperLink writes for a
    node that stopped reporting (Node Unavailable) has the SuperLink's own id as its source, not the node's."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
