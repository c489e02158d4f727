"""One error hierarchy for fedtl; every class carries the CLI exit code it maps to.

Exit codes: 2 usage / configuration, 3 data, 4 privacy budget, 5 model / weights,
6 federation (a run that could not complete).
"""

from __future__ import annotations


class FedTLError(Exception):
    """Base class: a problem a person can act on. The message says what and how to fix it."""

    exit_code = 1


class ConfigError(FedTLError):
    """An unknown key, a value out of range, or a bad combination of settings."""

    exit_code = 2


class DataError(FedTLError):
    """A missing, unreadable or malformed data file."""

    exit_code = 3


class PrivacyBudgetError(FedTLError):
    """A site's privacy budget would be exceeded, or its ledger cannot be trusted."""

    exit_code = 4


class LedgerError(PrivacyBudgetError):
    """A privacy ledger on disk is corrupt or belongs to another site."""


class BackboneError(FedTLError):
    """An unknown backbone, unavailable weights or weights whose hash does not match."""

    exit_code = 5


class WeightsUnavailableError(BackboneError):
    """Pretrained weights are neither in the local cache nor downloadable."""


class FederationError(FedTLError):
    """A federated run could not complete (no valid update, no site left, ...)."""

    exit_code = 6


class UpdateRejected(FederationError):
    """A client update failed validation (keys, shapes, dtypes, finite values)."""


class SiteWorkerError(FederationError):
    """A site worker (``fedtl.federation.worker``) that cannot start, is not trustworthy, or sent a bad frame."""
