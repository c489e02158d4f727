"""Sending a round's messages and collecting the replies, polled at a short interval.

Flower 1.41's deployment grid (``flwr.superlink.grid.http_grid``) polls the SuperLink for replies every
3 s in ``send_and_receive``, so every round ends up to 3 s after its last reply arrived; a pull of a few
message ids costs the SuperLink one small request. This is the same push-then-pull loop through the
grid's public ``push_messages`` / ``pull_messages``, polled every ``interval`` seconds (the simulation's
in-memory grid keeps its own, shorter, ``pull_interval``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

REPLY_POLL_INTERVAL_S = 0.2


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float,
                     interval: float = REPLY_POLL_INTERVAL_S) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds (all of them, or fewer)."""
    interval = min(interval, float(getattr(grid, "pull_interval", interval)))
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    return replies


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id → destination node of pushed ``messages`` (a grid sets each id when it pushes the message)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def reply_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply is about: the destination of the message it answers. An error the SuperLink writes for a
    node that stopped reporting (Node Unavailable) has the SuperLink's own id as its source, not the node's."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
