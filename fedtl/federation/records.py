"""Suffix tensors ↔ Flower records, and the validation every update goes through."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtl.model import check_state

# Every train reply carries exactly these metric keys (Flower's FedAvg requires equal keys).
TRAIN_METRIC_KEYS = ("num-examples", "declined", "epsilon", "noise-multiplier", "steps", "train-loss",
                     "seconds", "cache-hit")


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in state.items()))


def to_state(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def record_bytes(record: ArrayRecord) -> int:
    """Serialized tensor bytes as Flower sends them."""
    return int(record.count_bytes())


def train_reply(arrays: ArrayRecord, metrics: dict[str, float], *, site: str = "", reason: str = "") -> RecordDict:
    """A train reply: the suffix tensors, fixed metric keys, and the site's name and any reason."""
    values = {k: float(metrics.get(k, 0.0)) for k in TRAIN_METRIC_KEYS}
    values = {k: (v if math.isfinite(v) else -1.0) for k, v in values.items()}
    values["num-examples"] = int(values["num-examples"])
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(values),
                       "info": ConfigRecord({"site": site, "reason": reason})})


def validate_update(content: RecordDict, expected: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Everything wrong with a train reply: record layout, keys, shapes, dtypes, finiteness, weight."""
    if len(content.array_records) != 1:
        return [f"expected one ArrayRecord, got {len(content.array_records)}"]
    if len(content.metric_records) != 1:
        return [f"expected one MetricRecord, got {len(content.metric_records)}"]
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    problems = []
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or not n > 0 or not math.isfinite(float(n)):
        problems.append(f"`num-examples` must be a positive number, got {n!r}")
    state = {}
    for key, array in arrays.items():
        try:
            state[key] = array.numpy()
        except (ValueError, TypeError, EOFError) as exc:
            problems.append(f"`{key}` cannot be deserialized ({exc})")
    problems += check_state(state, expected) if not problems else []
    return problems
