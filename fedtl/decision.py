"""The decision rule that turns class probabilities into a label, as a run records it.

A run's ``suffix.safetensors`` may carry a calibrated rule in its metadata under ``fedtl.decision``
(JSON); without one the rule is the argmax. Two rules exist:

    {"rule": "argmax"}                                                  any number of classes
    {"rule": "threshold", "positive-class": 1, "threshold": 0.42}       binary only: label = positive
                                                                        class iff P(positive) >= threshold
    {"rule": "bias", "bias": [0.0, 0.4, -0.2]}                         multi-class: label = argmax over classes
                                                                        of log P(class) + bias[class]
    (a threshold or bias rule may say what it was chosen on: "chosen-on": "central validation (524 images)")

``fedtl predict``, ``fedtl export`` and whatever calibrates a run share this one reader and writer, so
a rule is applied the same way everywhere. A malformed entry is a :class:`~fedtl.errors.ConfigError`
naming the value, never a silent fall-back to the argmax.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedtl.errors import ConfigError

METADATA_KEY = "fedtl.decision"
DECISION_FROM = "decision-from"  # a personal suffix's metadata: "run" = predicted with the run's rule
RULES = ("argmax", "threshold", "bias")
MAX_BIAS = 50.0  # |offset| of a bias rule, in log-probability units


@dataclass(frozen=True)
class Decision:
    rule: str = "argmax"
    threshold: float = 0.5  # threshold rule only: P(positive_class) >= threshold -> positive_class
    positive_class: int = 1  # threshold rule only
    chosen_on: str = ""  # threshold / bias rules: what it was calibrated on (shown to people, never used)
    bias: tuple[float, ...] = ()  # bias rule only: one offset per class, added to log P(class) before the argmax

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"Decision rule must be one of {', '.join(RULES)}, got {self.rule!r}.")
        if self.rule == "threshold":
            if isinstance(self.positive_class, bool) or not isinstance(self.positive_class, int) \
                    or self.positive_class not in (0, 1):
                raise ConfigError(f"Decision `positive-class` must be 0 or 1 (binary tasks only), got {self.positive_class!r}.")
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                    or not math.isfinite(self.threshold) or not 0.0 <= self.threshold <= 1.0:
                raise ConfigError(f"Decision `threshold` must be a number in [0, 1], got {self.threshold!r}.")
            object.__setattr__(self, "threshold", float(self.threshold))
        if self.rule == "bias":
            b = self.bias
            if not isinstance(b, (list, tuple)) or len(b) < 2 or any(
                    isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or abs(x) > MAX_BIAS
                    for x in b):
                raise ConfigError(f"Decision `bias` must be a list of at least 2 numbers in [-{MAX_BIAS:g}, "
                                  f"{MAX_BIAS:g}] (one per class), got {b!r}.")
            object.__setattr__(self, "bias", tuple(float(x) for x in b))
        if not isinstance(self.chosen_on, str):
            raise ConfigError(f"Decision `chosen-on` must be a string, got {self.chosen_on!r}.")

    def check_classes(self, num_classes: int) -> None:
        """Refuse a threshold rule for a model that is not binary."""
        if self.rule == "threshold" and num_classes != 2:
            raise ConfigError(f"A threshold decision rule needs a binary model; this one has {num_classes} classes.")
        if self.rule == "bias" and len(self.bias) != num_classes:
            raise ConfigError(f"A bias decision rule has {len(self.bias)} offsets; this model has {num_classes} classes.")

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """``(N, C)`` probabilities → ``(N,)`` int64 labels."""
        p = np.asarray(probs)
        if p.ndim != 2 or p.shape[1] < 1:
            raise ValueError(f"expected probabilities of shape (N, C), got {p.shape}")
        if self.rule == "argmax":
            return p.argmax(axis=1).astype(np.int64)
        self.check_classes(p.shape[1])
        if self.rule == "bias":
            return (np.log(np.clip(p, 1e-30, None)) + np.asarray(self.bias)).argmax(axis=1).astype(np.int64)
        positive = p[:, self.positive_class] >= self.threshold
        return np.where(positive, self.positive_class, 1 - self.positive_class).astype(np.int64)

    def to_dict(self) -> dict:
        if self.rule == "argmax":
            return {"rule": "argmax"}
        if self.rule == "bias":
            body = {"rule": "bias", "bias": list(self.bias)}
        else:
            body = {"rule": "threshold", "positive-class": self.positive_class, "threshold": self.threshold}
        return {**body, "chosen-on": self.chosen_on} if self.chosen_on else body

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata entry (``{"fedtl.decision": "<json>"}``) that :func:`decision_from_metadata` reads."""
        return {METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    def describe(self) -> str:
        if self.rule == "argmax":
            return "argmax"
        chosen = f" (chosen on {self.chosen_on})" if self.chosen_on else ""
        if self.rule == "bias":
            return "argmax of log P + [" + ", ".join(f"{b:+.2f}" for b in self.bias) + "]" + chosen
        return f"class {self.positive_class} iff P(class {self.positive_class}) >= {self.threshold:g}{chosen}"


def decision_from_metadata(meta: Mapping[str, str] | None) -> Decision:
    """The rule recorded in safetensors metadata; the argmax when ``fedtl.decision`` is absent."""
    if not meta or METADATA_KEY not in meta:
        return Decision()
    text = meta[METADATA_KEY]
    try:
        body = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"`{METADATA_KEY}` metadata must be a JSON object, got {text!r}.") from exc
    if not isinstance(body, dict):
        raise ConfigError(f"`{METADATA_KEY}` metadata must be a JSON object, got {text!r}.")
    rule = body.get("rule")
    allowed = {"argmax": {"rule"}, "threshold": {"rule", "positive-class", "threshold", "chosen-on"},
               "bias": {"rule", "bias", "chosen-on"}}.get(rule)
    if allowed is None:
        raise ConfigError(f"`{METADATA_KEY}` `rule` must be one of {', '.join(RULES)}, got {rule!r}.")
    extra = sorted(set(body) - allowed)
    if extra:
        raise ConfigError(f"`{METADATA_KEY}` has unknown key(s) {', '.join(extra)} for rule {rule!r}; "
                          f"allowed: {', '.join(sorted(allowed))}.")
    if rule == "threshold":
        if "threshold" not in body:
            raise ConfigError(f"`{METADATA_KEY}` rule 'threshold' needs a `threshold`, got {text!r}.")
        return Decision("threshold", body["threshold"], body.get("positive-class", 1), body.get("chosen-on", ""))
    if rule == "bias":
        if "bias" not in body:
            raise ConfigError(f"`{METADATA_KEY}` rule 'bias' needs a `bias` list, got {text!r}.")
        return Decision("bias", chosen_on=body.get("chosen-on", ""), bias=body["bias"])
    return Decision()
