"""Suffix tensors ↔ Flower records, and the validation every update goes through."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtl.model import check_state
from fedtl.standardize import FeatureStandardizer

# Every train reply carries exactly these metric keys (Flower's FedAvg requires equal keys), and
# nothing else leaves a site: no training loss, no exact example count, no steps or timings.
TRAIN_METRIC_KEYS = ("num-examples", "declined", "epsilon", "delta", "target-epsilon")
TRAIN_INFO_KEYS = ("site", "reason", "accountant")
MAX_ROUNDS = 100_000
MAX_CLASSES = 1000
MAX_REPLY_WINDOW = 86400  # seconds: federation.round-timeout's own bound


def coarse_count(n: int) -> int:
    """The FedAvg weight a site reports: its example count rounded to a quarter-octave
    (2^(k/4), within ±9 %), so the exact size of its data set does not leave the site."""
    if n <= 0:
        return 0
    return max(1, int(round(2 ** (round(4 * math.log2(n)) / 4))))


def config_int(config, key: str, low: int, high: int, default: int | None = None) -> int:
    """A request's ``config[key]`` (``default`` when absent) as an int: a whole number (an int, or a float without
    a fraction; never a bool) in [low, high], else ValueError naming the key, the range and the value."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or not low <= int(value) <= high:
        raise ValueError(f"`{key}` must be an integer in [{low}, {high}], got {value!r:.60}")
    return int(value)


def config_num_classes(config) -> int:
    """A request's ``num-classes``: 0 when not given (simulation: the data set's), else 2 to :data:`MAX_CLASSES`."""
    num_classes = config_int(config, "num-classes", 0, MAX_CLASSES, 0)
    if num_classes == 1:
        raise ValueError("`num-classes` must be at least 2, got 1")
    return num_classes


def config_class_names(config, num_classes: int) -> tuple[str, ...]:
    """A request's ``class-names`` (the server's ``model.class-names``): () when not given, else ``num_classes``
    distinct names (when it is known), each 1 to :data:`fedtl.config.MAX_CLASS_NAME` printable characters."""
    from fedtl.config import MAX_CLASS_NAME, parse_class_names

    value = config.get("class-names", "")
    if value == "":
        return ()
    if not isinstance(value, str) or len(value) > MAX_CLASSES * (MAX_CLASS_NAME + 1):
        raise ValueError(f"`class-names` must be a string of comma-separated names, got {value!r:.80}")
    try:
        names = parse_class_names(value)
    except ValueError as exc:
        raise ValueError(f"`class-names` {exc}, got {value!r:.80}") from None
    if num_classes and len(names) != num_classes:
        raise ValueError(f"`class-names` names {len(names)} classes, the request's `num-classes` is {num_classes}")
    return names


def class_names_problem(site_classes: tuple[str, ...], run_names: tuple[str, ...]) -> str:
    """Why a site whose ``data.classes`` are ``site_classes`` must not train on or evaluate a run whose classes are
    ``run_names`` ('' when it may: either side names none, or the names agree in order, case and surrounding blanks
    aside). The same names in another order would have it teach the federation swapped labels."""
    if not site_classes or not run_names:
        return ""
    mine = [c.strip().casefold() for c in site_classes]
    if mine == [c.casefold() for c in run_names]:
        return ""
    listed = f"this site's classes {list(site_classes)} (data.classes, in class-index order)"
    if sorted(mine) == sorted(c.casefold() for c in run_names):
        return (f"{listed} are the run's {list(run_names)} in another order: its labels would be swapped. Reorder "
                "data.classes in site.toml to the run's order (the labels CSV stays as it is).")
    return (f"{listed} are not the run's {list(run_names)}: the server and this site must agree on what each class "
            "is (rename the labels in the site's CSV and data.classes, or ask the operator about model.class-names).")


def config_sha256(config) -> str:
    """A request's ``backbone-sha256``: '' when not given, else 64 lowercase hex digits."""
    sha = config.get("backbone-sha256", "")
    if not isinstance(sha, str) or (sha and not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ValueError(f"`backbone-sha256` must be 64 lowercase hex digits, got {sha!r:.80}")
    return sha


def _config_choice(config, key: str, options: tuple[str, ...]) -> str:
    """A request's ``key``: '' when not given, else one of ``options`` (anything else is refused, naming the key)."""
    value = config.get(key, "")
    if value != "" and (not isinstance(value, str) or value not in options):
        raise ValueError(f"`{key}` must be one of {', '.join(options)}, got {value!r:.60}")
    return value


def config_pooling(config) -> str:
    """A request's ``pooling`` (how the server's model pools the cut network's maps): '' when not given (a site
    whose run config says ``auto`` then uses the spatial mean), else one of :data:`fedtl.config.POOLINGS`."""
    from fedtl.config import POOLINGS

    return _config_choice(config, "pooling", POOLINGS)


def config_head(config) -> str:
    """A request's ``head`` (the server's resolved ``model.head``): '' when not given (a site whose run config says
    ``auto`` then uses the linear head, the head of servers that sent none), else one of :data:`fedtl.config.HEADS`.
    A head that does not match the server's tensors only makes the site refuse them."""
    from fedtl.config import HEADS

    return _config_choice(config, "head", HEADS)


@dataclass(frozen=True)
class TrainRequest:
    """A server's train message, validated at the site like a file from a stranger."""

    server_round: int
    total_rounds: int
    run_id: str
    num_classes: int  # 0: not given (simulation: the data set's)
    backbone_sha256: str
    noise_multiplier: float  # a proposal; 0 = none
    personalize_epochs: int = 0  # local fine-tuning after the last round to reserve budget for (site may cap)
    standardize: FeatureStandardizer | None = None  # the server's feature statistics (fedtl.standardize)
    pooling: str = ""  # the server's model.pooling ('' = not given)
    reply_within: float = 0.0  # seconds the server waits for the reply (its round-timeout); 0 = not given
    head: str = ""  # the server's model.head ('' = not given)
    local_head: bool = False  # personalization.kind = local-head: also train (and keep) a local head

    @classmethod
    def parse(cls, config) -> TrainRequest:
        total = config_int(config, "total-rounds", 1, MAX_ROUNDS)
        rnd = config_int(config, "server-round", 1, total)
        num_classes = config_num_classes(config)
        run_id = config.get("run-id", "")
        if not isinstance(run_id, str) or len(run_id) > 128:
            raise ValueError("`run-id` must be a string of at most 128 characters")
        sha = config_sha256(config)
        sigma = config.get("noise-multiplier", 0.0)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or not 0 <= sigma <= 1e4:
            raise ValueError(f"`noise-multiplier` must be a finite number in [0, 10000], got {sigma!r}")
        from fedtl.config import MAX_PERSONALIZE_EPOCHS

        epochs = config_int(config, "personalize-epochs", 0, MAX_PERSONALIZE_EPOCHS, 0)
        window = config.get("reply-within", 0.0)
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not math.isfinite(window) \
                or not 0 <= window <= MAX_REPLY_WINDOW:
            raise ValueError(f"`reply-within` must be a number of seconds in [0, {MAX_REPLY_WINDOW}], got {window!r:.60}")
        local = config_int(config, "local-head", 0, 1, 0)
        return cls(rnd, total, run_id, num_classes, sha, float(sigma), epochs, FeatureStandardizer.from_config(config),
                   config_pooling(config), float(window), config_head(config), bool(local))


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in state.items()))


def to_state(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def record_bytes(record: ArrayRecord) -> int:
    """Serialized tensor bytes as Flower sends them."""
    return int(record.count_bytes())


def train_reply(arrays: ArrayRecord, metrics: dict[str, float], *, site: str = "", reason: str = "",
                accountant: str = "") -> RecordDict:
    """A train reply: the suffix tensors, exactly :data:`TRAIN_METRIC_KEYS`, the site's name, accountant
    and any reason. ``metrics["num-examples"]`` is coarsened here (:func:`coarse_count`)."""
    values = {k: float(metrics.get(k, 0.0)) for k in TRAIN_METRIC_KEYS}
    values = {k: (v if math.isfinite(v) else -1.0) for k, v in values.items()}
    values["num-examples"] = coarse_count(int(values["num-examples"]))
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(values),
                       "info": ConfigRecord({"site": site, "reason": reason, "accountant": accountant})})


MAGNITUDE_FACTOR = 1e3  # a reply whose largest value exceeds 1e3 × (largest global value + 1) is rejected


def validate_reply(content: RecordDict, expected: dict[str, tuple[tuple[int, ...], str]],
                   current: dict | None = None) -> tuple[list[str], dict[str, float] | None]:
    """Everything wrong with a train reply, and its metrics as checked floats (None if unusable).

    Exactly :data:`TRAIN_METRIC_KEYS`, each a finite number (``declined`` 0 or 1, ``epsilon`` ≥ 0 or
    −1, ``num-examples`` > 0 unless declined); the info record's values strings; then, unless the
    site declined, the tensors (:func:`validate_update`) and their magnitude against ``current``.
    """
    if len(content.metric_records) != 1:
        return [f"expected one MetricRecord, got {len(content.metric_records)}"], None
    raw = next(iter(content.metric_records.values()))
    keys = set(raw.keys())
    if keys != set(TRAIN_METRIC_KEYS):
        extra, missing = sorted(keys - set(TRAIN_METRIC_KEYS)), sorted(set(TRAIN_METRIC_KEYS) - keys)
        return [f"metric keys differ from the protocol's (unexpected: {extra[:5]}, missing: {missing})"], None
    metrics, problems = {}, []
    for key in TRAIN_METRIC_KEYS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            problems.append(f"`{key}` must be a finite number, got {value!r:.60}")
        else:
            metrics[key] = float(value)
    if problems:
        return problems, None
    if metrics["declined"] not in (0.0, 1.0):
        problems.append(f"`declined` must be 0 or 1, got {metrics['declined']!r}")
    if not (metrics["epsilon"] >= 0 or metrics["epsilon"] == -1):
        problems.append(f"`epsilon` must be >= 0 (or -1: not reported), got {metrics['epsilon']!r}")
    if "info" in content.config_records:
        for key, value in content["info"].items():
            if key not in TRAIN_INFO_KEYS or not isinstance(value, str):
                problems.append(f"info `{key}` is not part of the protocol or not a string")
    if problems:
        return problems, None
    if metrics["declined"]:
        return [], metrics
    problems = validate_update(content, expected)
    if not problems and current is not None:
        arrays = next(iter(content.array_records.values()))
        scale = max((float(np.abs(v).max()) for v in current.values() if v.size), default=0.0) + 1.0
        top = max(float(np.abs(arrays[k].numpy()).max()) for k in expected if arrays[k].numpy().size)
        if top > MAGNITUDE_FACTOR * scale:
            problems.append(f"values up to {top:.3g}, more than {MAGNITUDE_FACTOR:g} × the global suffix's "
                            f"{scale - 1:.3g} (+1)")
    return problems, metrics


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
