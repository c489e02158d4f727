"""Standardizing statistics from the sites, for a server without validation data of its own.

The head trains on standardized features (``train.standardize = server``, :mod:`fedtl.standardize`): per-dimension
mean and scale of what it reads, taken by the server on its validation data. A server without data used to have
none, so ``model.pooling = auto`` fell back to the spatial mean on raw features, which trains a weaker head
(docs/benchmarks.md, "Without server data"). Before the first round such a server now asks every site for the
statistics of its *evaluation* images (both splits, no labels) under the richer pooling; their coordinate-wise
median standardizes training, and without any it falls back as before.

Protocol (both directions untrusted):

- request (``MessageType.EVALUATE``): the evaluation's config (``num-classes``, ``backbone-sha256``, ``pooling``,
  ``head``) with ``feature-statistics = 1``, and the initial suffix as ``arrays``;
- reply: exactly :data:`STATS_METRIC_KEYS` — ``n`` (the images the statistics are taken on; 0 when the site sends
  none), ``feature-mean`` and ``feature-scale`` (``fedtl.standardize.KEYS``; empty when n = 0) — and ``info``
  (``site``, ``reason``).

What it releases: 2 × D numbers (D = 672 for the default pooling) describing a site's evaluation images, however
few (at least :data:`MIN_STAT_IMAGES`): released statistics, not DP, like the evaluation figures
(``docs/privacy.md``); a site with ``release-statistics = false`` (by default as its ``release-scores``) or without
``[evaluation]`` sends none. The training
images never enter them, so a site's DP guarantee is unchanged; the statistics a server then sends with each
train request are, for the site, a fixed preprocessing as before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedtl.standardize import KEYS, FeatureStandardizer, server_standardizer

log = logging.getLogger(__name__)

STATS_METRIC_KEYS = ("n", *KEYS)
STATS_INFO_KEYS = ("site", "reason")
REQUEST_KEY = "feature-statistics"
MIN_STAT_IMAGES = 20  # a site sends statistics of no fewer evaluation images
STATS_FILE = "feature-statistics.json"  # in the run directory: the statistics a run trained with (resume reads them)
MAX_IMAGES = 10_000_000


def wants_statistics(content: RecordDict) -> bool:
    """Whether an evaluate message asks for feature statistics (a malformed flag: it does not)."""
    try:
        return content["config"].get(REQUEST_KEY, 0) == 1
    except (KeyError, TypeError, AttributeError):
        return False


def stats_reply(stats: FeatureStandardizer | None, n: int = 0, *, site: str, reason: str = "") -> RecordDict:
    """A site's reply: its statistics over ``n`` evaluation images, or none (n = 0) and why."""
    body = stats.to_config() if stats is not None and n else {k: [] for k in KEYS}
    values = {"n": int(n) if stats is not None else 0, **body}
    return RecordDict({"metrics": MetricRecord(values), "info": ConfigRecord({"site": site[:64], "reason": reason[:1000]})})


def site_statistics(cfg, model, data, *, site: str, release: bool = True) -> RecordDict:
    """The reply of a site whose evaluation data are ``data`` (a ``SiteEvalData``, its splits' cached features) to a
    statistics request, ``model`` the server's initial suffix loaded: the statistics of what the head reads on all
    its evaluation images (:func:`fedtl.standardize.server_standardizer`, as the server computes them on its own
    validation data), or none with the reason."""
    def none(reason: str) -> RecordDict:
        log.info("Site %s sends no feature statistics to the server: %s.", site, reason)
        return stats_reply(None, site=site, reason=reason)

    if not release:
        return none("this site does not release feature statistics (evaluation.release-statistics = false)")
    feats = [f for f, y in data.splits.values() if len(y)]
    n = sum(len(f) for f in feats)
    if n < MIN_STAT_IMAGES:
        return none(f"fewer than {MIN_STAT_IMAGES} evaluation images")
    stats = server_standardizer(cfg, torch.cat(feats), model)
    if stats is None:
        return none("the run does not standardize (train.standardize)")
    # what leaves the site, in its own log (docs/privacy.md: released statistics, not DP; no labels, no training images)
    log.info("Site %s sends the server the feature statistics of its %d evaluation images: the mean and scale of "
             "each of %d features (no labels, no training images; evaluation.release-statistics).", site, n, stats.dim)
    return stats_reply(stats, n, site=site)


def parse_stats_reply(content: RecordDict, dim: int) -> tuple[str, FeatureStandardizer | None, str]:
    """(site name claimed, its statistics or None, reason). Raises ValueError naming what is wrong: the protocol's keys,
    n not an integer, statistics of fewer than :data:`MIN_STAT_IMAGES` images, vectors that fail a site's own checks
    of a server's statistics (:meth:`FeatureStandardizer.from_config`), or of another width than the head's."""
    from fedtl.federation.fedeval import CheckedReply

    reply = CheckedReply.check(content, STATS_METRIC_KEYS, STATS_INFO_KEYS)
    n = int(reply.number("n", 0, MAX_IMAGES, integer=True))
    if n == 0:
        if any(reply.metrics[k] for k in KEYS):
            raise ValueError("statistics sent with n = 0")
        return reply.site, None, reply.reason or "sent no statistics"
    if n < MIN_STAT_IMAGES:
        raise ValueError(f"statistics of {n} images; at least {MIN_STAT_IMAGES} are required")
    stats = FeatureStandardizer.from_config({k: reply.metrics[k] for k in KEYS})
    if stats is None or stats.dim != dim:
        raise ValueError(f"statistics of {stats.dim if stats else 0} dimensions; the head takes {dim}")
    return reply.site, stats, reply.reason


def pooled_statistics(stats: list[FeatureStandardizer]) -> FeatureStandardizer:
    """The coordinate-wise median of the sites' means and of their scales (the mean of one or two sites'): one site's
    values, however extreme, move neither past the other sites' range when three or more answer."""
    def pool(vectors: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(vectors).double()
        return x.median(dim=0).values if len(vectors) > 2 else x.mean(0)

    return FeatureStandardizer(pool([s.mean for s in stats]), pool([s.scale for s in stats]))


@dataclass
class SiteStatistics:
    """The replies to one statistics request (what ``fedeval.ask_sites`` fills)."""

    sites: dict[str, FeatureStandardizer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)

    def add(self, site: str, stats: FeatureStandardizer | None, reason: str) -> None:
        if stats is None:
            self.skipped[site] = reason
        else:
            self.sites[site] = stats


def statistics_from_sites(grid, strategy, arrays: ArrayRecord, config: ConfigRecord, dim: int,
                          timeout: float) -> tuple[FeatureStandardizer | None, SiteStatistics]:
    """Ask every connected site for its evaluation images' statistics; their pooled median, or None when no site
    sent any (logged either way, with each site's reason)."""
    from fedtl.federation.fedeval import ask_sites

    result = SiteStatistics()
    ask_sites(grid, strategy, result, MessageType.EVALUATE, arrays, ConfigRecord({**dict(config), REQUEST_KEY: 1}),
              timeout=timeout, parse=lambda content: parse_stats_reply(content, dim), what="Feature statistics")
    for site, why in sorted(result.skipped.items()):
        log.info("Feature statistics: %s sent none (%s).", site, why)
    if not result.sites:
        return None, result
    log.info("Sites train the head on %d features standardized with the median statistics of %d site(s)' evaluation "
             "images (the server holds no validation data).", dim, len(result.sites))
    return pooled_statistics(list(result.sites.values())), result


def save_statistics(out: Path, stats: FeatureStandardizer) -> None:
    """Keep the statistics in the run directory, atomically: a crash leaves the old file or the new, never a part."""
    from fedtl.files import write_atomically

    write_atomically(Path(out) / STATS_FILE, json.dumps(stats.to_config()).encode())


def load_statistics(out: Path) -> FeatureStandardizer | None:
    """The statistics an interrupted run trained with (None: it had none); a damaged file is an error."""
    path = out / STATS_FILE
    if not path.exists():
        return None
    try:
        stats = FeatureStandardizer.from_config(json.loads(path.read_text()))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        from fedtl.errors import ConfigError

        raise ConfigError(f"{path} is damaged ({exc}); the run cannot be resumed with the statistics it trained "
                          "with.") from exc
    return stats
