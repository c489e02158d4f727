"""Opacus DP-SGD, the site's privacy policy, its secret randomness and its durable ledger."""

from fedtl.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon_of
from fedtl.privacy.ledger import PrivacyLedger, open_ledger, read_ledger
from fedtl.privacy.policy import PrivacyPolicy, Proposal, RoundPlan, plan_personalize, plan_round

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "PrivacyPolicy", "Proposal", "RoundPlan", "calibrate_noise", "epsilon_of",
           "open_ledger", "plan_personalize", "plan_round", "read_ledger"]
