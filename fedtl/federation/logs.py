"""Quiet logs: one line per round from fedtl, and none of Flower's or Ray's routine noise unless asked.

``fedtl simulate --verbose`` (or ``FEDTL_VERBOSE=1`` for a deployed ServerApp) shows everything.
"""

from __future__ import annotations

import logging
import os
import sys

# Flower's routine lines: per-round sampling/aggregation notes, the run_simulation deprecation
# banner, and the note that its own federated evaluation is off (fedtl runs its own).
FLOWER_NOISE = ("fraction_evaluate is set to 0.0", "DEPRECATED FEATURE", "deprecated feature",
                "configure_train: Sampled", "aggregate_train: Received", "configure_evaluate: Sampled",
                "aggregate_evaluate: Received", "Manually terminating ClientAppActor")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in FLOWER_NOISE)


_FILTER = _DropNoise()


def verbose_requested() -> bool:
    return os.environ.get("FEDTL_VERBOSE", "") not in ("", "0")


def quiet_flower(verbose: bool | None = None) -> None:
    """Drop Flower's routine lines and Ray's accelerator tip (idempotent); nothing changes when verbose."""
    if verbose if verbose is not None else verbose_requested():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning tip, every run
    flwr = logging.getLogger("flwr")
    if _FILTER not in flwr.filters:
        flwr.addFilter(_FILTER)
    for handler in flwr.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


class _ProgressHandler(logging.StreamHandler):
    """fedtl's own lines on stderr in a process where nothing configured logging (:func:`show_progress`)."""


def show_progress() -> None:
    """fedtl's INFO lines — each round's figures, the run's summary — on stderr when nothing configured logging, as
    in a deployed ServerApp process, whose output ``flwr run --stream`` shows (without it only warnings reached the
    stream: a deployment trial saw no round at all). A process that configured logging (``fedtl simulate``) is left
    alone; idempotent."""
    fedtl = logging.getLogger("fedtl")
    if logging.getLogger().handlers or any(isinstance(h, _ProgressHandler) for h in fedtl.handlers):
        return
    handler = _ProgressHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    fedtl.addHandler(handler)
    if fedtl.getEffectiveLevel() > logging.INFO:
        fedtl.setLevel(logging.INFO)
