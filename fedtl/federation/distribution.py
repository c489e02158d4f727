"""Server side of backbone distribution: every site must hold the pinned prefix before it trains.

The server pins the backbone by name and sha256, asks each connected site (QUERY messages) and
sends the weights file once to sites lacking it; the site verifies the hash against its own
allow-list (``fedtl.federation.deployment``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtl.config import FedTLConfig
from fedtl.federation.polling import destinations, reply_node

log = logging.getLogger(__name__)


def ensure_backbone(grid: Grid, cfg: FedTLConfig, pinned_sha256: str, expected_sites: int,
                    timeout: float = 600.0, report: dict | None = None) -> dict[int, str]:
    """Make every connected site hold the pinned backbone: ask each, send the file to those lacking it.

    Returns ``{node_id: problem}`` for sites that still cannot use it (they will decline to train);
    ``report`` receives the transfer's ``bytes``, ``sites`` and ``seconds`` (until every reply) when one was sent.
    """
    from flwr.app import Array, Message, MessageType, RecordDict

    from fedtl.backbones import build_backbone

    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected_sites and time.monotonic() < deadline:
        time.sleep(1.0)
    nodes = list(grid.get_node_ids())
    ask = ConfigRecord({"action": "backbone-status", "backbone": cfg.model.backbone, "sha256": pinned_sha256})
    asked = [Message(RecordDict({"config": ask}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = grid.send_and_receive(asked, timeout=timeout)
    sent = destinations(asked)  # errors for unavailable nodes come from the SuperLink's id: match by message
    lacking, problems = [], {}
    for r in replies:
        if r.has_error():
            problems[reply_node(r, sent)] = r.error.reason
        elif not r.content["status"]["has"]:
            lacking.append(reply_node(r, sent))
    if lacking:
        path = build_backbone(cfg.model.backbone).weights_path
        payload = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        log.info("Sending %s weights (%d bytes) to %d site(s) lacking them.", cfg.model.backbone, payload.size, len(lacking))
        send = ConfigRecord({"action": "backbone-install", "backbone": cfg.model.backbone, "sha256": pinned_sha256})
        weights = ArrayRecord({"file": Array(payload)})
        t0 = time.perf_counter()
        installs = [Message(RecordDict({"config": send, "weights": weights}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in lacking]
        replies = grid.send_and_receive(installs, timeout=timeout)
        sent = destinations(installs)
        seconds = time.perf_counter() - t0
        log.info("Backbone transfer: %d bytes to %d site(s), replies in %.2f s.", payload.size, len(lacking), seconds)
        if report is not None:
            report.update(bytes=int(payload.size), sites=len(lacking), seconds=round(seconds, 2))
        for r in replies:
            if r.has_error():
                problems[reply_node(r, sent)] = r.error.reason
            elif not r.content["status"]["has"]:
                problems[reply_node(r, sent)] = str(r.content["status"]["error"])
    for node, problem in problems.items():
        log.warning("Node %d cannot use the pinned backbone: %s", node, problem)
    return problems
