"""What a site does with a personalize request: DP fine-tuning of the global suffix, kept at the site.

The site scores the global suffix on its validation and test splits, fine-tunes it on its training data
under its privacy plan (:func:`fedtl.privacy.policy.plan_personalize`; the ledger entry is saved before
anything is reported), and keeps the fine-tuned suffix (or the halfway blend of global and fine-tuned) only on
evidence that it ranks the site's *validation* split better than the global one — a paired bootstrap lower
bound on the AUC gain above 0 (never test; without a defined validation AUC, the global one). The kept suffix
is written atomically to ``<state dir>/personal-suffix.safetensors`` and never sent; only the figures of
:func:`fedtl.federation.personalize.personal_reply` leave the site. A site whose ``site.toml`` says
``personalize-dp = false`` fine-tunes without noise and spends no ε (the suffix's metadata then says ``dp: false``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedtl.config import FedTLConfig
from fedtl.decision import DECISION_FROM, Decision
from fedtl.evaluation import MIN_PER_CLASS, auc_gain_bound, too_few_to_weigh
from fedtl.errors import LedgerError
from fedtl.model import TransferModel
from fedtl.privacy import open_ledger, plan_personalize
from fedtl.privacy.ledger import PERSONALIZE
from fedtl.privacy.policy import Decline, PrivacyPolicy, personalize_epochs, personalizes_privately
from fedtl.standardize import FeatureStandardizer
from fedtl.training import DPSettings, evaluate_suffix, train_suffix

log = logging.getLogger(__name__)

PERSONAL_SUFFIX = "personal-suffix.safetensors"


def personal_suffix_path(policy: PrivacyPolicy) -> Path:
    """The site's personal suffix: next to its ledger, in its state dir (simulated: ``<run>/sites/<site>/``)."""
    return policy.ledger_path.parent / PERSONAL_SUFFIX


@dataclass
class PersonalOutcome:
    """What a personalize request did at a site; only :attr:`figures`, the flags, ε and reason are reported."""

    site: str
    personalized: bool = False
    kept_tuned: bool = False
    epsilon: float = -1.0
    reason: str = ""  # sent to the server: never a local path
    figures: dict[str, dict] = field(default_factory=dict)  # model ("global" | "tuned") -> split -> figures
    tuned_dp: bool | None = None  # whether the candidate was trained with DP (None: as the policy says)
    path: Path | None = None  # stays at the site


BLENDS = (1.0, 0.5)  # candidates: the fine-tuned suffix, and halfway between the global and the fine-tuned one
EVIDENCE = 0.9  # one-sided confidence that a candidate ranks the site's validation split better than the global


def blend(global_state: dict, tuned_state: dict, alpha: float) -> dict:
    """``global + alpha · (tuned − global)`` per tensor (1: the fine-tuned suffix). Halfway keeps the direction
    the site's data pulls in and halves the DP noise the fine-tuning added."""
    return {k: (g + alpha * (tuned_state[k] - g)) if g.is_floating_point() else tuned_state[k]
            for k, g in global_state.items()}


def choose_personal(model: TransferModel, global_state: dict, tuned_state: dict, eval_data,
                    confidence: float = EVIDENCE) -> tuple[float, dict, float]:
    """The candidate (blend weight, state, evidence) a site keeps: among :data:`BLENDS`, the one whose
    lower confidence bound on the validation-AUC gain over the global suffix (paired bootstrap,
    :func:`fedtl.evaluation.auc_gain_bound`) is largest; ``evidence`` is that bound, and the site keeps the
    candidate only when it is above 0 — otherwise the global suffix.

    Keeping the fine-tuned suffix whenever its validation AUC was at least the global one's lost 0.018
    test AUC at a site whose two validation AUCs were equal at four decimals (site-shift benchmark,
    docs/benchmarks.md). Without validation data, with a validation split of one class (AUC undefined), or with
    fewer than :data:`~fedtl.evaluation.MIN_PER_CLASS` images of a class it holds (the bootstrap cannot vary it),
    there is no evidence: ``(0.0, global_state, nan)``. Validation loss is not used instead: a site whose validation split held one class chose the fine-tuned suffix
    by its lower loss and lost 0.51 test AUC.
    """
    val = (eval_data.splits.get("val") if eval_data is not None else None) or (None, None)
    feats, labels = val
    if labels is None or len(labels) == 0:
        return 0.0, global_state, math.nan

    def probs(state):
        model.load_trainable_state(state)
        return evaluate_suffix(model, feats, labels).probabilities

    base = probs(global_state)
    best = (0.0, global_state, math.nan)
    for alpha in BLENDS:
        state = blend(global_state, tuned_state, alpha)
        bound = auc_gain_bound(base, probs(state), labels.numpy(), confidence=confidence)
        if math.isfinite(bound) and (not math.isfinite(best[2]) or bound > best[2]):
            best = (alpha, state, bound)
    model.load_trainable_state(global_state)
    return best


def personal_decision(cfg: FedTLConfig, model: TransferModel, eval_data, kept_tuned: bool) -> Decision | None:
    """The decision rule for the loaded (kept) suffix, chosen on the site's own validation split as the server
    chooses the run's on its own (``evaluation.decision``): the suffix serves this site's class mix. ``None`` — use the
    run's rule — when the site kept the global suffix and its validation split cannot choose one (none, one class, or
    fewer than :data:`MIN_PER_CLASS` images of a class it holds): the run's rule was chosen for that suffix on more data. A kept
    candidate had such a split (:func:`choose_personal`); without one, the argmax."""
    from fedtl.evaluation import central_decision

    feats, labels = ((eval_data.splits.get("val") if eval_data is not None else None) or (None, None))
    if labels is None or len(labels) == 0 or len(np.unique(labels.numpy())) < 2 or too_few_to_weigh(labels.numpy()):
        return Decision() if kept_tuned else None
    probs = evaluate_suffix(model, feats, labels).probabilities
    rule = central_decision(probs, labels.numpy(), cfg.evaluation.decision)
    return rule if rule.rule == "argmax" else replace(rule, chosen_on=f"the site's validation split ({len(labels)} images)")


def personalize_site(cfg: FedTLConfig, model: TransferModel, data, eval_data, policy: PrivacyPolicy, *,
                     run_id: str, epochs: int, standardize: FeatureStandardizer | None = None,
                     kind: str = "finetune") -> PersonalOutcome:
    """Fine-tune the loaded (global) suffix at this site (``kind = "local-head"``: put the site's local head,
    trained during the rounds, on it instead: nothing trains, nothing is spent); save the kept one in the state dir.

    ``data``: the site's :class:`~fedtl.federation.site.SiteData`; ``eval_data``: its
    :class:`~fedtl.federation.site.SiteEvalData` or None (no evaluation data: figures stay empty).
    On decline (policy, budget, ledger) the global suffix is what the site keeps, and nothing is spent.
    ``standardize``: the server's feature statistics, when it sent any (as in its train requests).
    """
    from fedtl.federation.checkpoint import save_tensors_atomically
    from fedtl.federation.site import _generator, evaluate_site

    out = PersonalOutcome(site=policy.site)
    global_state = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    if eval_data is not None:
        out.figures["global"] = evaluate_site(model, eval_data)
    n = int(data.labels.shape[0])
    lr_scale = cfg.adapters.effective_lr_scale()
    if kind == "local-head":
        tuned_state = _local_candidate(model, global_state, policy, run_id, out)
        if tuned_state is None:
            return out
    elif not policy.dp:  # a simulation with --no-dp
        granted = personalize_epochs(policy, epochs)
        if granted <= 0 or n <= 0:
            out.reason = f"Site `{policy.site}` does not fine-tune locally; it keeps the global suffix."
            return out
        res = train_suffix(model, data.features, data.labels, cfg.train, lr_scale=lr_scale,
                           batch_size=cfg.train.batch_size, epochs=granted, generator=_generator(policy, run_id, 0),
                           standardize=standardize)
        out.personalized = True
        log.info("Site %s fine-tuned locally without DP: %d steps, loss %.4f", policy.site, res.steps, res.loss)
    else:
        try:
            with open_ledger(policy.ledger_path, site=policy.site, delta=policy.delta, accountant=policy.accountant,
                             target_epsilon=policy.target_epsilon) as ledger:
                plan = plan_personalize(policy, ledger, run_id=run_id, requested_epochs=epochs,
                                        batch_size=cfg.train.batch_size, num_examples=n)
                if isinstance(plan, Decline):
                    out.reason, out.epsilon = plan.reason, plan.epsilon
                    log.warning("Site %s does not fine-tune: %s", policy.site, plan.reason)
                    return out
                for note in plan.notes:
                    log.info("Site %s: %s", policy.site, note)
                if personalizes_privately(policy):
                    dp = DPSettings(plan.noise_multiplier, policy.max_grad_norm, plan.sample_rate, policy.accountant)
                    res = train_suffix(model, data.features, data.labels, cfg.train, lr_scale=lr_scale,
                                       batch_size=plan.batch_size, epochs=plan.epochs, dp=dp,
                                       generator=_generator(policy, run_id, 0), reseed=not policy.seeded,
                                       standardize=standardize)
                    ledger.append(run=run_id, round=0, noise_multiplier=plan.noise_multiplier,
                                  sample_rate=plan.sample_rate, steps=res.steps, kind=PERSONALIZE)
                    ledger.save()  # durable before any figure of the fine-tuned suffix is reported
                else:  # personalize-dp = false: no noise, no ledger entry; the suffix stays here
                    res = train_suffix(model, data.features, data.labels, cfg.train, lr_scale=lr_scale,
                                       batch_size=plan.batch_size, epochs=plan.epochs,
                                       generator=_generator(policy, run_id, 0), standardize=standardize)
                out.epsilon, out.personalized = ledger.epsilon(), True
        except LedgerError as exc:  # never train blind
            log.error("Site %s does not fine-tune: %s", policy.site, exc)
            out.reason = (f"Site `{policy.site}` cannot use its privacy ledger (details in the site's log); it keeps "
                          "the global suffix.")
            return out
        if personalizes_privately(policy):
            log.info("Site %s fine-tuned locally: σ=%.3f, %d steps, loss %.4f, ε=%.3f of %g", policy.site,
                     plan.noise_multiplier, res.steps, res.loss, out.epsilon, policy.target_epsilon)
        else:
            log.info("Site %s fine-tuned locally without noise (personalize-dp = false): %d steps, loss %.4f; ε "
                     "stays %.3f of %g", policy.site, res.steps, res.loss, out.epsilon, policy.target_epsilon)
    if kind != "local-head":
        tuned_state = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    alpha, candidate, evidence = choose_personal(model, global_state, tuned_state, eval_data)
    if eval_data is not None:  # the candidate the site weighed against the global suffix
        model.load_trainable_state(candidate if math.isfinite(evidence) else tuned_state)
        out.figures["tuned"] = evaluate_site(model, eval_data)
    out.kept_tuned = evidence > 0  # NaN (no evidence) is not
    if not out.kept_tuned:  # said in the reply (the server's report lists it), never a local path
        out.reason = (f"no evidence on its validation split: {_no_evidence(eval_data)}" if not math.isfinite(evidence)
                      else f"its validation split did not favour the candidate (the {100 * EVIDENCE:.0f}% lower bound "
                           f"of the AUC gain was {evidence:.4f}; keeping it needs more than 0)")
        log.info("Site %s keeps the global suffix: %s.", policy.site, out.reason)
    kept = candidate if out.kept_tuned else global_state
    model.load_trainable_state(kept)
    out.path = personal_suffix_path(policy)
    out.path.parent.mkdir(parents=True, exist_ok=True)
    decision = personal_decision(cfg, model, eval_data, out.kept_tuned)  # the site's own rule for the suffix it keeps
    save_tensors_atomically(kept, out.path, metadata={
        "run": str(run_id)[:128], "site": policy.site, "kept": "tuned" if out.kept_tuned else "global",
        "backbone": cfg.model.backbone, "weights_sha256": getattr(model, "weights_sha256", "") or "",
        **(decision.to_metadata() if decision is not None else {DECISION_FROM: "run"}),
        "blend": f"{alpha:g}" if out.kept_tuned else "0", "epsilon": f"{out.epsilon:.6f}", "personalization": kind,
        "epochs": "0" if kind == "local-head" else str(epochs),
        # whether the kept suffix is differentially private in this site's data (no: it must not leave the site)
        "dp": "true" if policy.dp and (not out.kept_tuned or (policy.personalize_dp if out.tuned_dp is None
                                                                else out.tuned_dp)) else "false"})
    log.info("Site %s keeps the %s suffix (validation AUC gain, %.0f%% lower bound: %.4f); saved to %s", policy.site,
             (f"local-head (blend {alpha:g})" if kind == "local-head" else f"fine-tuned (blend {alpha:g})")
             if out.kept_tuned else "global", 100 * EVIDENCE, evidence, out.path)
    return out


def _no_evidence(eval_data) -> str:
    """Why :func:`choose_personal` found no evidence (sent in the reply: no count the evaluation replies do not
    already release)."""
    labels = (eval_data.splits.get("val") or (None, None))[1] if eval_data is not None else None
    if labels is None or len(labels) == 0:
        return "the site has no validation split"
    if len(np.unique(labels.numpy())) < 2:
        return "it holds one class (AUC undefined)"
    if too_few_to_weigh(labels.numpy()):
        return f"it holds fewer than {MIN_PER_CLASS} images of some class (weighing a candidate needs {MIN_PER_CLASS} of each)"
    return "the AUC is undefined there"


def _local_candidate(model: TransferModel, global_state: dict, policy: PrivacyPolicy, run_id: str,
                     out: PersonalOutcome) -> dict | None:
    """The global suffix with this site's local head of this run (``personalization.kind = local-head``), or None
    with ``out.reason`` set. Nothing trains and nothing is spent: the local head came from the rounds' private steps."""
    from fedtl.federation.local_head import read_local_head, with_local_head
    from fedtl.privacy.ledger import read_ledger

    if policy.dp:
        try:
            out.epsilon = read_ledger(policy.ledger_path).epsilon()
        except LedgerError as exc:
            log.warning("Site %s cannot read its privacy ledger (%s); ε is not reported.", policy.site, exc)
    if policy.max_personalize_epochs <= 0:
        out.reason = (f"Site `{policy.site}` does not personalize (its policy: max-personalize-epochs = 0); it keeps "
                      "the global suffix.")
        return None
    head, why = read_local_head(model, policy, run_id)
    if head is None:
        out.reason = f"Site `{policy.site}` keeps the global suffix: {why}."
        log.warning("Site %s has no local head of run %s to weigh: %s.", policy.site, run_id, why)
        return None
    out.personalized, out.tuned_dp = True, bool(head.dp)
    return with_local_head(global_state, head)
