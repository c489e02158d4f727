"""Weighted FedAvg over suffix tensors only, with every reply validated first."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtl.federation.records import record_bytes, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    bytes_down: int = 0
    bytes_up: int = 0
    trained: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict] = field(default_factory=dict)  # per site, as the site reported it
    timed_out: list[str] = field(default_factory=list)  # sites asked that did not reply in time
    attempts: int = 1


class SuffixFedAvg(FedAvg):
    """FedAvg (weighted by ``num-examples``) that accepts only well-formed suffix updates.

    A reply is dropped, with its reason logged, when it carries an error, when the site declined
    (e.g. its privacy budget is spent), or when its tensors do not match the expected names,
    shapes and dtypes or hold non-finite values. The round goes on with the remaining sites.
    """

    def __init__(self, expected: dict[str, tuple[tuple[int, ...], str]], **kwargs) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)  # the server evaluates centrally
        super().__init__(**kwargs)
        self.expected = expected
        self.rounds: dict[int, RoundStats] = {}
        self.node_sites: dict[int, str] = {}  # node id -> the site name it last replied with

    def site_name(self, node: int) -> str:
        return self.node_sites.get(node, f"node-{node}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.bytes_down = record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats.failed[f"node-{node}"] = msg.error.reason
                log.warning("Round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            content = msg.content
            metrics = next(iter(content.metric_records.values()), None)
            info = content["info"] if "info" in content.config_records else {}
            site = str(info.get("site", "") or f"node-{node}")
            self.node_sites[node] = site
            if metrics is not None and float(metrics.get("epsilon", -1.0)) >= 0:
                stats.epsilon[site] = float(metrics["epsilon"])
                stats.privacy[site] = {"epsilon": float(metrics["epsilon"]), "delta": float(metrics.get("delta", 0.0)),
                                       "accountant": str(info.get("accountant", "")),
                                       "budget": float(metrics.get("target-epsilon", 0.0))}
            if metrics is not None and metrics.get("declined", 0.0):
                reason = str(info.get("reason", "") or "declined")
                stats.declined[site] = reason
                log.warning("Round %d: site %s declined: %s", server_round, site, reason)
                continue
            problems = validate_update(content, self.expected)
            if problems:
                stats.rejected[site] = "; ".join(problems)
                log.warning("Round %d: update from site %s (node %d) rejected: %s", server_round, site, node,
                            "; ".join(problems))
                continue
            stats.bytes_up += record_bytes(next(iter(content.array_records.values())))
            stats.trained.append(site)
            accepted.append(msg)
        if not accepted:
            log.warning("Round %d: no valid update; the global suffix is unchanged.", server_round)
            return None, None
        return super().aggregate_train(server_round, accepted)
