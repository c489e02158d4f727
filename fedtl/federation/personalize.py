"""Personalization after the last round: each site fine-tunes the final global suffix on its own data.

Protocol (both directions are untrusted input for the receiver):

- request (``MessageType.TRAIN`` + ``.personalize``): ``arrays`` (the selected global suffix) and
  ``config`` with ``run-id``, ``kind`` (``finetune``: fine-tune it now; ``local-head``: weigh it with the site's local
  head, trained during the rounds, :mod:`fedtl.federation.local_head`), ``epochs``, ``num-classes``,
  ``backbone-sha256``;
- reply: **metrics only**, never arrays — exactly :data:`PERSONAL_METRIC_KEYS`: whether the site
  fine-tuned, whether it kept the fine-tuned suffix (chosen on its validation split), its cumulative ε,
  and for the global and the fine-tuned suffix (the candidate it weighed: fine-tuned or halfway blended,
  ``fedtl.federation.personal_site.choose_personal``) on its validation and test splits the number of examples,
  AUC (−1: undefined), argmax accuracy and loss; ``info`` (``site``, ``reason``).

The personal suffix stays in the site's state dir (``fedtl.federation.personal_site``). Its DP steps were
planned with the rounds (``fedtl.privacy.policy.plan_round``), so a site never exceeds its budget for them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedtl.config import MAX_PERSONALIZE_EPOCHS
from fedtl.standardize import FeatureStandardizer
from fedtl.federation.fedeval import CheckedReply, ask_sites

log = logging.getLogger(__name__)

ACTION = "personalize"  # the ClientApp's train action: message type "train.personalize"
KINDS = ("finetune", "local-head")  # what a personalize request may ask (personalization.kind)
MODELS = ("global", "tuned")
SPLITS = ("val", "test")
_FIGS = ("n", "auc", "acc", "loss")
PERSONAL_METRIC_KEYS = ("personalized", "kept-tuned", "epsilon",
                        *(f"{m}-{s}-{k}" for m in MODELS for s in SPLITS for k in _FIGS))
PERSONAL_INFO_KEYS = ("site", "reason")
MAX_EXAMPLES = 10_000_000
MAX_LOSS = 1e4
MAX_EPSILON = 1e6


@dataclass(frozen=True)
class PersonalizeRequest:
    """A server's personalize message, validated at the site like a file from a stranger."""

    run_id: str
    epochs: int
    num_classes: int  # 0: not given (simulation: the data set's)
    backbone_sha256: str
    standardize: FeatureStandardizer | None = None  # the server's feature statistics (fedtl.standardize)
    pooling: str = ""  # the server's model.pooling ('' = not given)
    head: str = ""  # the server's model.head ('' = not given)
    kind: str = "finetune"  # personalization.kind: finetune | local-head

    @classmethod
    def parse(cls, config) -> PersonalizeRequest:
        from fedtl.federation.records import config_head, config_int, config_num_classes, config_pooling, config_sha256

        epochs = config_int(config, "epochs", 1, MAX_PERSONALIZE_EPOCHS)
        num_classes = config_num_classes(config)
        run_id = config.get("run-id", "")
        if not isinstance(run_id, str) or not run_id or len(run_id) > 128:
            raise ValueError("`run-id` must be a non-empty string of at most 128 characters")
        sha = config_sha256(config)
        kind = config.get("kind", "finetune")
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, got {kind!r:.60}")
        return cls(run_id, epochs, num_classes, sha, FeatureStandardizer.from_config(config), config_pooling(config),
                   config_head(config), kind)


def personal_reply(figures: dict[str, dict[str, dict]] | None, *, site: str, personalized: bool = False,
                   kept_tuned: bool = False, epsilon: float = -1.0, reason: str = "") -> RecordDict:
    """A site's personalize reply: released statistics only. ``figures[model][split]`` holds n, auc, acc, loss."""
    values: dict = {"personalized": int(bool(personalized)), "kept-tuned": int(bool(personalized and kept_tuned)),
                    "epsilon": float(epsilon) if math.isfinite(epsilon) and epsilon >= 0 else -1.0}  # as the ledger says
    for m in MODELS:
        for s in SPLITS:
            f = ((figures or {}).get(m) or {}).get(s) or {}
            n = int(f.get("n", 0))
            values[f"{m}-{s}-n"] = n
            for k in ("auc", "acc", "loss"):
                v = float(f.get(k, float("nan")))
                values[f"{m}-{s}-{k}"] = round(v, 6) if math.isfinite(v) and n else -1.0
    return RecordDict({"metrics": MetricRecord(values), "info": ConfigRecord({"site": site[:64], "reason": reason[:1000]})})


def parse_personal_reply(content: RecordDict) -> tuple[str, dict, str]:
    """(site name claimed, figures, reason). Raises ValueError naming the problem of a malformed reply.

    A reply holding any array is refused outright: a personal suffix never leaves its site.
    """
    if len(content.array_records):
        raise ValueError("the reply carries tensors; a personalize reply holds metrics only")
    reply = CheckedReply.check(content, PERSONAL_METRIC_KEYS, PERSONAL_INFO_KEYS, info_only=True)
    out: dict = {"personalized": bool(reply.number("personalized", 0, 1, integer=True)),
                 "kept_tuned": bool(reply.number("kept-tuned", 0, 1, integer=True))}
    eps = reply.optional("epsilon", MAX_EPSILON, unset="not reported")
    out["epsilon"] = None if math.isnan(eps) else eps
    if out["kept_tuned"] and not out["personalized"]:
        raise ValueError("`kept-tuned` is 1 but the site did not fine-tune")
    for m in MODELS:
        for s in SPLITS:
            out[f"{m}_{s}"] = reply.figures(f"{m}-{s}", MAX_EXAMPLES, MAX_LOSS)
    return reply.site, out, reply.reason


@dataclass
class Personalization:
    """Each site's figures under the global and its personal suffix, and who did not personalize."""

    sites: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # site -> why it kept the global suffix / no figures
    timed_out: list[str] = field(default_factory=list)

    def add(self, site: str, parsed: dict, reason: str) -> None:
        personal = "tuned" if parsed["kept_tuned"] else "global"
        row = {"personalized": parsed["personalized"], "kept": personal, "epsilon": parsed["epsilon"]}
        for s in SPLITS:
            for k in ("n", "auc", "acc", "loss"):
                row[f"global_{s}_{k}"] = parsed[f"global_{s}"][k]
                row[f"tuned_{s}_{k}"] = parsed[f"tuned_{s}"][k]
                row[f"personal_{s}_{k}"] = parsed[f"{personal}_{s}"][k]
        self.sites[site] = row
        if not parsed["personalized"]:
            self.skipped[site] = reason or "did not fine-tune"
        elif personal == "global" and reason:  # weighed a candidate and kept the global suffix: the site says why
            self.skipped[site] = reason

    def table(self) -> dict:
        """The ``personalization`` entry of summary.json: per site global vs personal, worst site, largest loss."""
        return {"sites": dict(sorted(self.sites.items())), "skipped": dict(sorted(self.skipped.items())),
                "timed_out": self.timed_out, **compare(self.sites)}


def compare(sites: dict[str, dict], split: str = "test") -> dict:
    """Worst site's test AUC under the global and the personal suffix, and the largest per-site loss."""
    rows = {s: r for s, r in sites.items()
            if math.isfinite(r.get(f"global_{split}_auc", math.nan)) and math.isfinite(r.get(f"personal_{split}_auc", math.nan))}
    if not rows:
        return {"worst_site": None, "worst_global_auc": None, "worst_personal_auc": None, "worst_site_gain": None,
                "worst_personal_site": None, "max_loss": None, "mean_gain": None}
    worst = min(rows, key=lambda s: rows[s][f"global_{split}_auc"])
    worst_p = min(rows, key=lambda s: rows[s][f"personal_{split}_auc"])
    deltas = {s: r[f"personal_{split}_auc"] - r[f"global_{split}_auc"] for s, r in rows.items()}
    return {"worst_site": worst, "worst_global_auc": rows[worst][f"global_{split}_auc"],
            "worst_personal_auc": rows[worst_p][f"personal_{split}_auc"], "worst_personal_site": worst_p,
            "worst_site_gain": rows[worst_p][f"personal_{split}_auc"] - rows[worst][f"global_{split}_auc"],
            "max_loss": max(0.0, -min(deltas.values())), "mean_gain": sum(deltas.values()) / len(deltas)}


def personalize_at_sites(grid, strategy, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> Personalization:
    """Send the final global suffix to every connected site to fine-tune; collect validated figures."""
    result = Personalization()
    ask_sites(grid, strategy, result, f"{MessageType.TRAIN}.{ACTION}", arrays, config, timeout=timeout,
              parse=parse_personal_reply, what="Personalization")
    t = result.table()
    if t["worst_site"] is not None:
        log.info("Personalization at %d site(s): worst site's test AUC %.4f (global) -> %.4f (personal); largest "
                 "loss at a site %.4f", len(result.sites), t["worst_global_auc"], t["worst_personal_auc"], t["max_loss"])
    return result
