"""Aggregation of suffix tensors: every reply validated and bounded, then one of Flower's strategies.

Every reply goes through the same gate, whatever the aggregation:

1. **Validated completely** (:func:`fedtl.federation.records.validate_reply`): record layout, exactly
   the expected metric keys with finite numbers of the right kind, tensor names, shapes, dtypes,
   finite values, and a magnitude bound relative to the current global suffix. Any exception while
   looking at one reply is that reply's rejection (with its reason in ``metrics.jsonl``), never
   the round's end.
2. **Bounded**: the update ``Δ = w_site − w_global`` is clipped to ``update_clip`` × the median
   update norm of the round, and the weight (``num-examples``) is replaced by the server's
   (``federation.weighting``, :func:`fedtl.weighting.aggregation_weights`): by default the reported count
   capped at ``weight_cap`` × the median (1 ×), or 1 per site — one site can neither scale its update
   nor claim a huge data set.
3. **Aggregated** by Flower's own strategy, chosen by ``federation.aggregation``: FedAvg, FedMedian,
   FedTrimmedAvg, Krum, MultiKrum or Bulyan (``flwr.serverapp.strategy``; not rewritten here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedtl.config import FederationConfig
from fedtl.weighting import aggregation_weights
from fedtl.federation.polling import reply_node
from fedtl.federation.records import record_bytes, validate_reply

log = logging.getLogger(__name__)
_DEFAULTS = FederationConfig()  # the bounds' defaults are the config's, stated once

AGGREGATIONS = {"fedavg": FedAvg, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
                "multikrum": MultiKrum, "bulyan": Bulyan}


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
    # sites that took part in an earlier round (of this server process) but were not connected when it was sent
    not_connected: list[str] = field(default_factory=list)
    bounded: dict[str, str] = field(default_factory=dict)  # sites whose update norm was clipped
    capped: dict[str, str] = field(default_factory=dict)  # sites whose reported weight was capped (routine: the median)
    attempts: int = 1


class BoundedSuffixAggregation:
    """Mixin over a Flower strategy: only validated, bounded suffix updates reach its ``aggregate_train``."""

    def __init__(self, expected: dict[str, tuple[tuple[int, ...], str]], *, update_clip: float = _DEFAULTS.update_clip,
                 weight_cap: float = _DEFAULTS.weight_cap, weighting: str = _DEFAULTS.weighting, **kwargs) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)  # the server evaluates centrally
        super().__init__(**kwargs)
        self.expected = expected
        self.update_clip, self.weight_cap, self.weighting = update_clip, weight_cap, weighting
        aggregation_weights([], weighting, weight_cap)  # an unknown weighting fails here, not in round 1
        self.rounds: dict[int, RoundStats] = {}
        self.node_sites: dict[int, str] = {}  # node id -> the site name it last replied with
        self.sent_to: dict[str, int] = {}  # this round's message id -> the node it went to (set by the server)
        self.current: dict[str, np.ndarray] | None = None  # the global suffix sent this round
        self._said: set[tuple[str, str]] = set()  # (site, decline reason) already logged

    def site_name(self, node: int) -> str:
        return self.node_sites.get(node, f"node-{node}")

    def reply_node(self, msg: Message) -> int:
        """The node a reply is about (:func:`fedtl.federation.polling.reply_node`, this round's messages)."""
        return reply_node(msg, self.sent_to)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.bytes_down = record_bytes(arrays) * len(messages)
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        accepted = []
        for msg in replies:
            try:
                ok = self._admit(server_round, msg, stats)
            except Exception as exc:  # noqa: BLE001 - a reply must never end the round
                site = self.site_name(self.reply_node(msg))
                stats.rejected[site] = f"the reply could not be processed ({type(exc).__name__}: {exc})"[:500]
                log.warning("Round %d: update from %s rejected: %s", server_round, site, stats.rejected[site])
                continue
            if ok is not None:
                accepted.append(ok)
        if not accepted:
            log.warning("Round %d: no valid update; the global suffix is unchanged.", server_round)
            return None, None
        self._bound(accepted, stats)
        try:
            arrays, metrics = super().aggregate_train(server_round, [m for _, m in accepted])
        except Exception as exc:  # noqa: BLE001 - e.g. Bulyan with too few replies: keep the model
            log.warning("Round %d: %s could not aggregate (%s); the global suffix is unchanged.", server_round,
                        type(self).__name__, exc)
            return None, None
        if arrays is not None and not all(np.isfinite(a.numpy()).all() for a in arrays.values()):
            log.warning("Round %d: the aggregate is not finite; the global suffix is unchanged.", server_round)
            return None, None
        return arrays, metrics

    # ---- one reply ---------------------------------------------------------------------
    def _admit(self, server_round: int, msg: Message, stats: RoundStats):
        node = self.reply_node(msg)
        if msg.has_error():
            stats.failed[self.site_name(node)] = str(msg.error.reason)[:500]
            who = f"{self.node_sites[node]} (node {node})" if node in self.node_sites else f"node {node}"
            log.warning("Round %d: %s failed: %s", server_round, who, msg.error.reason)
            return None
        content = msg.content
        info = content["info"] if "info" in content.config_records else {}
        raw_site = info.get("site", "")
        site = raw_site if isinstance(raw_site, str) and 0 < len(raw_site) <= 64 else f"node-{node}"
        self.node_sites[node] = site
        problems, metrics = validate_reply(content, self.expected, self.current)
        if metrics is not None and metrics["epsilon"] >= 0:
            stats.epsilon[site] = metrics["epsilon"]
            accountant = info.get("accountant", "")
            stats.privacy[site] = {"epsilon": metrics["epsilon"], "delta": metrics["delta"],
                                   "accountant": accountant if isinstance(accountant, str) else "",
                                   "budget": metrics["target-epsilon"]}
        if metrics is not None and metrics["declined"] and not problems[1:]:
            reason = info.get("reason", "")
            stats.declined[site] = (reason if isinstance(reason, str) and reason else "declined")[:1000]
            said = (site, stats.declined[site])  # a site's reason once at WARNING; the round line counts repeats
            (log.debug if said in self._said else log.warning)("Round %d: site %s declined: %s", server_round, site,
                                                               stats.declined[site])
            self._said.add(said)
            return None
        if problems:
            stats.rejected[site] = "; ".join(problems)[:1000]
            log.warning("Round %d: update from site %s (node %d) rejected: %s", server_round, site, node,
                        stats.rejected[site])
            return None
        stats.bytes_up += record_bytes(next(iter(content.array_records.values())))
        stats.trained.append(site)
        return site, msg

    # ---- bounded influence -------------------------------------------------------------
    def _bound(self, accepted: list, stats: RoundStats) -> None:
        """Set each weight to the server's (:func:`fedtl.weighting.aggregation_weights`) and clip each update to
        ``update_clip`` × the round's median update norm (in place; caps noted in ``stats.capped``, clips in
        ``stats.bounded``)."""
        weights = [float(next(iter(m.content.metric_records.values()))["num-examples"]) for _, m in accepted]
        for (site, msg), weight, server_weight in zip(accepted, weights,
                                                      aggregation_weights(weights, self.weighting, self.weight_cap)):
            if server_weight != weight:
                next(iter(msg.content.metric_records.values()))["num-examples"] = server_weight
                if self.weighting == "examples":  # with `sites` every weight is 1: not a cap worth a note
                    stats.capped[site] = f"weight {weight:.4g} capped to {server_weight:.4g}"
        if self.current is not None:
            names = list(self.expected)
            deltas = []
            for _, msg in accepted:
                arrays = next(iter(msg.content.array_records.values()))
                deltas.append({k: arrays[k].numpy().astype(np.float64) - self.current[k] for k in names})
            norms = [math.sqrt(sum(float((d[k] ** 2).sum()) for k in names)) for d in deltas]
            bound = self.update_clip * float(np.median(norms)) if self.update_clip > 0 else math.inf
            for (site, msg), delta, norm in zip(accepted, deltas, norms):
                if norm > bound and norm > 0:
                    scale = bound / norm
                    key = next(iter(msg.content.array_records))
                    msg.content[key] = ArrayRecord({k: Array((self.current[k] + delta[k] * scale).astype(
                        self.expected[k][1])) for k in names})
                    stats.bounded[site] = f"update norm {norm:.3g} clipped to {bound:.3g}"
                    log.debug("Site %s bounded: %s", site, stats.bounded[site])  # counted in the round's line


def make_strategy(aggregation: str, expected: dict[str, tuple[tuple[int, ...], str]], *, max_hostile: int = 1,
                  sites: int = 10, update_clip: float = _DEFAULTS.update_clip, weight_cap: float = _DEFAULTS.weight_cap,
                  weighting: str = _DEFAULTS.weighting, **kwargs):
    """The validated, bounded version of Flower's strategy ``aggregation`` (see :data:`AGGREGATIONS`)."""
    base = AGGREGATIONS[aggregation]
    cls = type(f"BoundedSuffix{base.__name__}", (BoundedSuffixAggregation, base), {})
    max_hostile = min(max_hostile, max(0, sites - 1))  # a federation of one site has nobody to out-vote
    if base in (Krum, MultiKrum, Bulyan):
        kwargs["num_malicious_nodes"] = max_hostile
    if base is MultiKrum:
        kwargs.setdefault("num_nodes_to_select", max(1, sites - max_hostile))  # average all but f
    return cls(expected, update_clip=update_clip, weight_cap=weight_cap, weighting=weighting, **kwargs)


class SuffixFedAvg(BoundedSuffixAggregation, FedAvg):
    """FedAvg (weighted by ``num-examples``) over validated, bounded suffix updates."""
