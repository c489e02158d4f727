"""Opacus DP-SGD and the durable per-site privacy ledger."""

from fedtl.privacy.accounting import calibrate_noise, epsilon_of
from fedtl.privacy.ledger import PrivacyLedger

__all__ = ["PrivacyLedger", "calibrate_noise", "epsilon_of"]
