"""What a site does with a server's train, personalize or evaluate message, from its content to the reply's content.

One body for every path that serves a message: the ClientApp in its own process (a simulation, or a deployed
site without its worker) and the long-lived site worker (``fedtl.federation.worker``), so both run exactly the
same validation of the server's content. Takes Flower's plain values (the message's ``RecordDict``, the run
and node config as mappings), never a ``Context`` or ``Message``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from fedtl.config import FedTLConfig
from fedtl.errors import FedTLError
from fedtl.federation.records import (TrainRequest, class_names_problem, config_class_names, to_record, to_state,
                                      train_reply)
from fedtl.federation.site import (build_transfer_model, evaluate_site, ignored_privacy_settings, load_source,
                                   simulated_eval_data, simulated_policy, simulated_site_data, train_site)
from fedtl.federation.apps import config_from_run_config as run_config_of
from fedtl.privacy import Proposal

log = logging.getLogger(__name__)


def _site_of(conf: FedTLConfig, node: Mapping[str, Any], model, data=None):
    """(policy, data) for this node: a deployed site's own, or a simulated partition (``data``: already loaded)."""
    if "site-config" in node:
        from fedtl.federation.deployment import deployed_site_data, load_site_config, site_policy

        path = str(node["site-config"])
        policy = site_policy(load_site_config(path))
        ignored = ignored_privacy_settings(conf, policy)
        if ignored:
            log.warning("Site %s ignores the run's privacy settings (its site.toml is the authority): %s",
                        policy.site, ", ".join(ignored))
        return policy, data if data is not None else deployed_site_data(conf, model, path)
    site, num_sites = int(node["partition-id"]), int(node["num-partitions"])
    return simulated_policy(conf, site), simulated_site_data(conf, model, site, num_sites)


def _train_site_of(conf: FedTLConfig, node: Mapping[str, Any], num_classes: int):
    """(model, policy, data) for a train message. A deployed site whose features are cached gets the suffix
    alone (no backbone is built or imported: ``deployment.cached_site``); any other builds the model."""
    if "site-config" in node:
        from fedtl.federation.deployment import cached_site

        warm = cached_site(conf, str(node["site-config"]), num_classes)
        if warm is not None:
            model, data = warm
            policy, _ = _site_of(conf, node, model, data=data)
            return model, policy, data
    model = build_transfer_model(conf, num_classes)
    return (model, *_site_of(conf, node, model))


_BAD_SUFFIX = "the server's suffix tensors do not match the model"  # the reason of a reply refusing them


def _load_suffix(model, content: RecordDict, site: str, purpose: str = "") -> bool:
    """Load the server's suffix (``content["arrays"]``) into ``model``; False, logged, when its tensors are malformed
    or do not fit the model: the site refuses them (reason ``_BAD_SUFFIX``), it never crashes on them."""
    try:
        model.load_trainable_state(to_state(content["arrays"]))
    except Exception as exc:  # anything the server's tensors cause is that message's refusal
        log.error("Site %s refused the server's suffix%s: %s", site, f" {purpose}" if purpose else "", exc)
        return False
    return True


def _standardize_problem(model, request) -> str:
    """Why the server's feature statistics (if any) cannot train this model ('' when they can, or none came)."""
    if request.standardize is None:
        return ""
    problem = request.standardize.problem(model)
    return f"the server's feature statistics do not fit the model: {problem}" if problem else ""


def _with_server_model(conf: FedTLConfig, request) -> FedTLConfig:
    """The run config with the server's pooling and head (``model.pooling`` and ``model.head = auto`` are decided by
    the server and sent with every request); a request without them means the spatial mean and the linear head, what
    servers that sent none used. The site never decides them itself: its model must be the server's."""
    from fedtl.config import replace

    if request.pooling:
        conf = replace(conf, "model", pooling=request.pooling)
    if request.head:
        conf = replace(conf, "model", head=request.head)
    return conf.resolved(has_reference=False)


def _parse_request(kind: str, parse, refuse, content: RecordDict, run_config: Mapping[str, Any],
                   node: Mapping[str, Any], cfg: FedTLConfig | None,
                   node_id: int | None = None) -> tuple[FedTLConfig, Any, str] | RecordDict:
    """``(conf, request, site)`` for a server's ``kind`` message, or the reply refusing it.

    Everything the server sends is untrusted input: the run's config, then the message's ``config`` through
    ``parse`` (a deployed site requires its ``num-classes``); whatever does not validate is logged and answered
    with ``refuse(site=…, reason="invalid <kind> request: …")``. ``site`` is a deployed site's name from its
    site.toml; else, with ``node_id``, ``site-<partition-id>`` or the node id; without it (a simulated train), ''.
    """
    deployed = "site-config" in node
    site, site_classes = "", ()
    if node_id is not None:
        site = f"site-{int(node['partition-id'])}" if "partition-id" in node else str(node_id)
    try:
        conf = run_config_of(run_config, cfg)
        if deployed:  # a refusal names the site (a train refusal too: the server named it by its node id)
            from fedtl.federation.deployment import load_site_config

            site_config = load_site_config(str(node["site-config"]))
            site, site_classes = site_config.name, site_config.data.classes
        request = parse(content["config"])
        if deployed and not request.num_classes:
            raise ValueError("`num-classes` is required by a deployed site")
        run_names = config_class_names(content["config"], request.num_classes)
        conf = _with_server_model(conf, request)
    except (FedTLError, ValueError, KeyError, TypeError) as exc:
        log.error("%s request refused: %s", kind.capitalize(), exc)
        return refuse(site=site, reason=f"invalid {kind} request: {exc}")
    if deployed and run_names:
        problem = class_names_problem(site_classes, run_names)
        if problem:
            log.error("%s request refused: %s", kind.capitalize(), problem)
            return refuse(site=site, reason=problem)
    return conf, request, site


def handle_train(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: int, *,
                 cfg: FedTLConfig | None = None, threads: int = 0, received_at: float | None = None) -> RecordDict:
    """The reply's content to a train message: the trained suffix, or a refusal with its reason.

    ``received_at``: when the message reached the site (``time.monotonic()``; default: now). A site that is not
    ready to train before :data:`LATE_FRACTION` of the server's reply window (``reply-within``) has passed declines
    the round without spending privacy (:func:`late_reason`)."""
    received_at = time.monotonic() if received_at is None else received_at
    if threads:
        torch.set_num_threads(threads)
    deployed = "site-config" in node_config
    if deployed:
        from fedtl.federation.deployment import load_site_config

        load_site_config(str(node_config["site-config"]))  # its weights dir is looked up first
    base = {"num-examples": 0, "declined": 1.0, "epsilon": -1.0}
    parsed = _parse_request("train", TrainRequest.parse, functools.partial(train_reply, ArrayRecord(), base), content,
                            run_config, node_config, cfg)
    if isinstance(parsed, RecordDict):
        return parsed
    conf, request, _ = parsed
    num_classes = request.num_classes or load_source(conf.data.path).num_classes
    model, policy, data = _train_site_of(conf, node_config, num_classes)
    base.update({"num-examples": len(data.labels), "delta": policy.delta, "target-epsilon": policy.target_epsilon})
    refuse = functools.partial(train_reply, ArrayRecord(), base, site=policy.site, accountant=policy.accountant)
    if request.backbone_sha256 and model.weights_sha256 != request.backbone_sha256:
        return refuse(reason=f"Site `{policy.site}` holds `{conf.model.backbone}` weights with sha256 "
                             f"{model.weights_sha256[:16]}…, the server pinned {request.backbone_sha256[:16]}…; it "
                             "will not train.")
    if len(data.labels) and int(data.labels.max()) >= num_classes:
        return refuse(reason=f"Site `{policy.site}` has labels outside the federation's {num_classes} classes.")
    if not _load_suffix(model, content, policy.site):
        return refuse(reason=_BAD_SUFFIX)
    problem = _standardize_problem(model, request)
    if problem:
        log.error("Site %s refused the train request: %s", policy.site, problem)
        return refuse(reason=f"invalid train request: {problem}")
    if deployed:  # a request the site accepts: a restarted site worker warms its cache for these settings
        from fedtl.federation.warm_up import remember_feature_settings

        remember_feature_settings(conf, str(node_config["site-config"]))
    late = late_reason(policy.site, received_at, request.reply_within)
    if late:
        log.warning("Site %s declines round %d: %s", policy.site, request.server_round, late)
        return refuse(reason=late)
    proposal = Proposal(total_rounds=request.total_rounds, batch_size=conf.train.batch_size,
                        epochs=conf.train.epochs, noise_multiplier=request.noise_multiplier,
                        personalize_epochs=request.personalize_epochs)
    result = train_site(conf, model, data, policy, run_id=request.run_id or str(run_id),
                        server_round=request.server_round, proposal=proposal, standardize=request.standardize,
                        local_head=request.local_head)
    metrics = {"num-examples": result.num_examples, "declined": float(result.declined),
               "epsilon": result.epsilon, "delta": result.delta, "target-epsilon": result.budget}
    arrays = ArrayRecord() if result.declined else to_record(model.trainable_state())
    return train_reply(arrays, metrics, site=policy.site, reason=result.reason, accountant=result.accountant)


LATE_FRACTION = 0.9  # of the server's reply window: the rest is left for training and the reply's way back


def late_reason(site: str, received_at: float, reply_within: float) -> str:
    """Why a site that was ready to train only ``now − received_at`` seconds after a train message arrived declines
    it, or '' when it is in time (or the server gave no window). Its first round builds its feature cache (four
    prefix passes over every image by default), which a large site at a high resolution may not finish within the
    server's round-timeout; the server would drop its late reply, so the privacy spent on it would buy nothing. It
    declines instead, spending nothing, and its next round starts from the cache. A server can only make a site
    decline with this (as it can by not asking it): never make it spend more."""
    if not reply_within:
        return ""
    elapsed = time.monotonic() - received_at
    if elapsed <= LATE_FRACTION * reply_within:
        return ""
    return (f"Site `{site}` was ready to train {elapsed:.0f} s after the request arrived (its first round builds its "
            f"feature cache), past {LATE_FRACTION:.0%} of the server's {reply_within:g} s reply window "
            "(federation.round-timeout): it did not train and spent no privacy this round; its next round starts "
            "from the cache.")


def handle_evaluate(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                    node_id: int, *, cfg: FedTLConfig | None = None, threads: int = 0) -> RecordDict:
    """The reply's content to an evaluate message: the server's suffix scored on this site's own evaluation data
    (``[evaluation]`` in site.toml; a simulated site: its shares of the validation and test splits), or, when the
    message asks for them (``feature-statistics = 1``), the standardizing statistics of those images
    (:mod:`fedtl.federation.site_stats`). Released statistics only."""
    from fedtl.federation.fedeval import EvalRequest, eval_reply
    from fedtl.federation.site_stats import site_statistics, stats_reply, wants_statistics

    if threads:
        torch.set_num_threads(threads)
    node = node_config
    deployed = "site-config" in node
    statistics = wants_statistics(content)
    refuse = functools.partial(stats_reply if statistics else eval_reply, None)
    parsed = _parse_request("evaluate", EvalRequest.parse, refuse, content, run_config, node, cfg, node_id)
    if isinstance(parsed, RecordDict):
        return parsed
    conf, request, site = parsed
    num_classes = request.num_classes or load_source(conf.data.path).num_classes
    warm, release_scores = None, True
    if deployed:
        from fedtl.federation.deployment import cached_eval_site, load_site_config

        site_eval = load_site_config(str(node["site-config"])).evaluation
        if not site_eval.enabled:  # before any model is built
            return refuse(site=site, reason="this site does not evaluate")
        release_scores = site_eval.release_scores
        if statistics and not site_eval.release_statistics:  # before any model is built
            return site_statistics(conf, None, None, site=site, release=False)
        warm = cached_eval_site(conf, str(node["site-config"]), num_classes)
    model = warm[0] if warm is not None else build_transfer_model(conf, num_classes)
    if request.backbone_sha256 and model.weights_sha256 != request.backbone_sha256:
        return refuse(site=site, reason="the server pinned other backbone weights")
    if not _load_suffix(model, content, site, "for evaluation"):
        return refuse(site=site, reason=_BAD_SUFFIX)
    if warm is not None:
        data = warm[1]
    elif deployed:
        from fedtl.federation.deployment import deployed_eval_data

        data = deployed_eval_data(conf, model, str(node["site-config"]))
    else:
        data = simulated_eval_data(conf, model, int(node["partition-id"]), int(node["num-partitions"]))
    if statistics:  # no labels are used: the statistics of what the head reads on the evaluation images
        return site_statistics(conf, model, data, site=site)  # released: checked above (simulated sites: always)
    labels = torch.cat([y for _, y in data.splits.values()])
    if len(labels) and int(labels.max()) >= num_classes:
        return eval_reply(None, site=site, reason="labels outside the federation's classes")
    return eval_reply(evaluate_site(model, data, release_scores=release_scores), site=site)


def handle_personalize(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                       node_id: int, *, cfg: FedTLConfig | None = None, threads: int = 0) -> RecordDict:
    """The reply's content to a personalize message: fine-tune the final global suffix on this site's data under
    its remaining budget, keep the result in its state dir, reply with figures only
    (``fedtl.federation.personalize``)."""
    from fedtl.federation.personal_site import personalize_site
    from fedtl.federation.personalize import PersonalizeRequest, personal_reply

    if threads:
        torch.set_num_threads(threads)
    node = node_config
    deployed = "site-config" in node
    parsed = _parse_request("personalize", PersonalizeRequest.parse, functools.partial(personal_reply, None), content,
                            run_config, node, cfg, node_id)
    if isinstance(parsed, RecordDict):
        return parsed
    conf, request, site = parsed
    num_classes = request.num_classes or load_source(conf.data.path).num_classes
    model, policy, data = _train_site_of(conf, node, num_classes)
    if request.backbone_sha256 and model.weights_sha256 != request.backbone_sha256:
        return personal_reply(None, site=site, reason="the server pinned other backbone weights")
    if len(data.labels) and int(data.labels.max()) >= num_classes:
        return personal_reply(None, site=site, reason="labels outside the federation's classes")
    if not _load_suffix(model, content, site, "for personalization"):
        return personal_reply(None, site=site, reason=_BAD_SUFFIX)
    problem = _standardize_problem(model, request)
    if problem:
        log.error("Site %s refused the personalize request: %s", site, problem)
        return personal_reply(None, site=site, reason=f"invalid personalize request: {problem}")
    if deployed:
        from fedtl.federation.deployment import cached_eval_site, deployed_eval_data

        if hasattr(model, "prefix"):  # a full model computes the evaluation features itself
            eval_data = deployed_eval_data(conf, model, str(node["site-config"]))
        else:  # a warm SuffixModel has no backbone: the cached evaluation features, else a backbone builds them
            warm = cached_eval_site(conf, str(node["site-config"]), num_classes)  # (every test-time view cached)
            eval_data = warm[1] if warm is not None else deployed_eval_data(
                conf, build_transfer_model(conf, num_classes), str(node["site-config"]))
    else:
        eval_data = simulated_eval_data(conf, model, int(node["partition-id"]), int(node["num-partitions"]))
    out = personalize_site(conf, model, data, eval_data, policy, run_id=request.run_id, epochs=request.epochs,
                           standardize=request.standardize, kind=request.kind)
    return personal_reply(out.figures, site=policy.site, personalized=out.personalized, kept_tuned=out.kept_tuned,
                          epsilon=out.epsilon, reason=out.reason)
