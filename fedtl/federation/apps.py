"""The Flower ServerApp and ClientApp, built around a config (simulation) or Flower's run config.

``fedtl simulate`` builds both with its resolved config; ``flwr run`` and SuperLink/SuperNode
deployments import the module-level apps in ``server/app.py`` and ``clients/app.py``, which read
``context.run_config``. A SuperNode started with ``--node-config "site-config='site.toml'"`` is a
deployed data site (its own data, budget and ledger); one with ``partition-id``/``num-partitions``
is a simulated site holding a partition of the configured data set.
"""

from __future__ import annotations

import functools
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtl.config import FedTLConfig
from fedtl.errors import FedTLError
from fedtl.federation.records import TrainRequest, to_record, to_state, train_reply
from fedtl.federation.site import (build_transfer_model, evaluate_site, ignored_privacy_settings, load_source,
                                   simulated_eval_data, simulated_policy, simulated_site_data, train_site)
from fedtl.privacy import Proposal

log = logging.getLogger(__name__)

FLOWER_KEYS = ()  # run-config keys owned by Flower rather than fedtl (none so far)


def config_from_context(context: Context, fixed: FedTLConfig | None) -> FedTLConfig:
    return fixed if fixed is not None else FedTLConfig.from_run_config(context.run_config, ignore=FLOWER_KEYS)


def make_server_app(cfg: FedTLConfig | None = None, distribute_backbone: bool = True) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtl.federation.logs import quiet_flower

        quiet_flower()  # FEDTL_VERBOSE=1 keeps Flower's own lines
        from fedtl.federation.server import run_server  # the ServerApp's alone: a ClientApp never imports it

        run_server(grid, config_from_context(context, cfg), run_id=str(context.run_id),
                   distribute_backbone=distribute_backbone, demo_data=cfg is not None)

    return app


def _site_of(conf: FedTLConfig, context: Context, model, data=None):
    """(policy, data) for this node: a deployed site's own, or a simulated partition (``data``: already loaded)."""
    node = context.node_config
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


def _train_site_of(conf: FedTLConfig, context: Context, num_classes: int):
    """(model, policy, data) for a train message. A deployed site whose features are cached gets the suffix
    alone (no backbone is built or imported: ``deployment.cached_site``); any other builds the model."""
    if "site-config" in context.node_config:
        from fedtl.federation.deployment import cached_site

        warm = cached_site(conf, str(context.node_config["site-config"]), num_classes)
        if warm is not None:
            model, data = warm
            policy, _ = _site_of(conf, context, model, data=data)
            return model, policy, data
    model = build_transfer_model(conf, num_classes)
    return (model, *_site_of(conf, context, model))


def make_client_app(cfg: FedTLConfig | None = None, threads: int = 0) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedtl.federation.logs import quiet_flower

        quiet_flower()  # in a simulation's Ray worker too (idempotent)
        if threads:
            torch.set_num_threads(threads)
        deployed = "site-config" in context.node_config
        if deployed:
            from fedtl.federation.deployment import load_site_config

            load_site_config(str(context.node_config["site-config"]))  # its weights dir is looked up first
        base = {"num-examples": 0, "declined": 1.0, "epsilon": -1.0}
        try:  # everything the server sends is untrusted input: refuse what does not validate
            conf = config_from_context(context, cfg)
            request = TrainRequest.parse(msg.content["config"])
            if deployed and not request.num_classes:
                raise ValueError("`num-classes` is required by a deployed site")
        except (FedTLError, ValueError, KeyError, TypeError) as exc:
            log.error("Train request refused: %s", exc)
            return Message(train_reply(ArrayRecord(), base, reason=f"invalid train request: {exc}"), reply_to=msg)
        num_classes = request.num_classes or load_source(conf.data.path).num_classes
        model, policy, data = _train_site_of(conf, context, num_classes)
        base.update({"num-examples": len(data.labels), "delta": policy.delta, "target-epsilon": policy.target_epsilon})
        refuse = functools.partial(train_reply, ArrayRecord(), base, site=policy.site, accountant=policy.accountant)
        if request.backbone_sha256 and model.weights_sha256 != request.backbone_sha256:
            reason = (f"Site `{policy.site}` holds `{conf.model.backbone}` weights with sha256 "
                      f"{model.weights_sha256[:16]}…, the server pinned {request.backbone_sha256[:16]}…; it will not train.")
            return Message(refuse(reason=reason), reply_to=msg)
        if len(data.labels) and int(data.labels.max()) >= num_classes:
            reason = f"Site `{policy.site}` has labels outside the federation's {num_classes} classes."
            return Message(refuse(reason=reason), reply_to=msg)
        try:
            model.load_trainable_state(to_state(msg.content["arrays"]))
        except Exception as exc:  # a malformed suffix from the server: refuse, never crash the site
            log.error("Site %s refused the server's suffix: %s", policy.site, exc)
            return Message(refuse(reason="the server's suffix tensors do not match the model"), reply_to=msg)
        proposal = Proposal(total_rounds=request.total_rounds, batch_size=conf.train.batch_size,
                            epochs=conf.train.epochs, noise_multiplier=request.noise_multiplier,
                            personalize_epochs=request.personalize_epochs)
        result = train_site(conf, model, data, policy, run_id=request.run_id or str(context.run_id),
                            server_round=request.server_round, proposal=proposal)
        metrics = {"num-examples": result.num_examples, "declined": float(result.declined),
                   "epsilon": result.epsilon, "delta": result.delta, "target-epsilon": result.budget}
        arrays = ArrayRecord() if result.declined else to_record(model.trainable_state())
        return Message(train_reply(arrays, metrics, site=policy.site, reason=result.reason,
                                   accountant=result.accountant), reply_to=msg)

    @app.train("personalize")
    def personalize(msg: Message, context: Context) -> Message:
        """Fine-tune the final global suffix on this site's data under its remaining budget; keep the result in
        its state dir and reply with figures only (``fedtl.federation.personalize``)."""
        from fedtl.federation.logs import quiet_flower
        from fedtl.federation.personal_site import personalize_site
        from fedtl.federation.personalize import PersonalizeRequest, personal_reply

        quiet_flower()
        if threads:
            torch.set_num_threads(threads)
        node = context.node_config
        deployed = "site-config" in node
        site = f"site-{int(node['partition-id'])}" if "partition-id" in node else str(context.node_id)
        try:
            conf = config_from_context(context, cfg)
            if deployed:
                from fedtl.federation.deployment import load_site_config

                site = load_site_config(str(node["site-config"])).name
            request = PersonalizeRequest.parse(msg.content["config"])
            if deployed and not request.num_classes:
                raise ValueError("`num-classes` is required by a deployed site")
        except (FedTLError, ValueError, KeyError, TypeError) as exc:
            log.error("Personalize request refused: %s", exc)
            return Message(personal_reply(None, site=site, reason=f"invalid personalize request: {exc}"), reply_to=msg)
        num_classes = request.num_classes or load_source(conf.data.path).num_classes
        model, policy, data = _train_site_of(conf, context, num_classes)
        if request.backbone_sha256 and model.weights_sha256 != request.backbone_sha256:
            return Message(personal_reply(None, site=site, reason="the server pinned other backbone weights"),
                           reply_to=msg)
        if len(data.labels) and int(data.labels.max()) >= num_classes:
            return Message(personal_reply(None, site=site, reason="labels outside the federation's classes"),
                           reply_to=msg)
        try:
            model.load_trainable_state(to_state(msg.content["arrays"]))
        except Exception as exc:  # a malformed suffix from the server: refuse, never crash the site
            log.error("Site %s refused the server's suffix for personalization: %s", site, exc)
            return Message(personal_reply(None, site=site, reason="the server's suffix tensors do not match the model"),
                           reply_to=msg)
        if deployed:
            from fedtl.federation.deployment import deployed_eval_data

            eval_data = None
            if hasattr(model, "prefix"):  # a warm SuffixModel has no backbone to compute features with
                eval_data = deployed_eval_data(conf, model, str(node["site-config"]))
            else:
                from fedtl.federation.deployment import cached_eval_site

                warm = cached_eval_site(conf, str(node["site-config"]), num_classes)
                eval_data = warm[1] if warm is not None else None
        else:
            eval_data = simulated_eval_data(conf, model, int(node["partition-id"]), int(node["num-partitions"]))
        out = personalize_site(conf, model, data, eval_data, policy, run_id=request.run_id, epochs=request.epochs)
        return Message(personal_reply(out.figures, site=policy.site, personalized=out.personalized,
                                      kept_tuned=out.kept_tuned, epsilon=out.epsilon, reason=out.reason), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the server's suffix on this site's own evaluation data (``[evaluation]`` in site.toml;
        a simulated site: its shares of the validation and test splits). Released statistics only."""
        from fedtl.federation.fedeval import EvalRequest, eval_reply
        from fedtl.federation.logs import quiet_flower

        quiet_flower()
        if threads:
            torch.set_num_threads(threads)
        node = context.node_config
        deployed = "site-config" in node
        site = f"site-{int(node['partition-id'])}" if "partition-id" in node else str(context.node_id)
        try:
            conf = config_from_context(context, cfg)
            if deployed:
                from fedtl.federation.deployment import load_site_config

                site = load_site_config(str(node["site-config"])).name
            request = EvalRequest.parse(msg.content["config"])
            if deployed and not request.num_classes:
                raise ValueError("`num-classes` is required by a deployed site")
        except (FedTLError, ValueError, KeyError, TypeError) as exc:
            log.error("Evaluate request refused: %s", exc)
            return Message(eval_reply(None, site=site, reason=f"invalid evaluate request: {exc}"), reply_to=msg)
        num_classes = request.num_classes or load_source(conf.data.path).num_classes
        warm = None
        if deployed:
            from fedtl.federation.deployment import cached_eval_site

            if not load_site_config(str(node["site-config"])).evaluation.enabled:  # before any model is built
                return Message(eval_reply(None, site=site, reason="this site does not evaluate"), reply_to=msg)
            warm = cached_eval_site(conf, str(node["site-config"]), num_classes)
        model = warm[0] if warm is not None else build_transfer_model(conf, num_classes)
        if request.backbone_sha256 and model.weights_sha256 != request.backbone_sha256:
            return Message(eval_reply(None, site=site, reason="the server pinned other backbone weights"), reply_to=msg)
        try:
            model.load_trainable_state(to_state(msg.content["arrays"]))
        except Exception as exc:  # a malformed suffix from the server: refuse, never crash the site
            log.error("Site %s refused the server's suffix for evaluation: %s", site, exc)
            return Message(eval_reply(None, site=site, reason="the server's suffix tensors do not match the model"),
                           reply_to=msg)
        if warm is not None:
            data = warm[1]
        elif deployed:
            from fedtl.federation.deployment import deployed_eval_data

            data = deployed_eval_data(conf, model, str(node["site-config"]))
        else:
            data = simulated_eval_data(conf, model, int(node["partition-id"]), int(node["num-partitions"]))
        labels = torch.cat([y for _, y in data.splits.values()])
        if len(labels) and int(labels.max()) >= num_classes:
            return Message(eval_reply(None, site=site, reason="labels outside the federation's classes"), reply_to=msg)
        return Message(eval_reply(evaluate_site(model, data), site=site), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Backbone distribution: report whether this site holds the pinned weights, or install them.

        The message is checked like a file from a stranger (see ``deployment.backbone_query``): a malformed
        or refused one gets ``has = False`` with the reason, never an exception.
        """
        status = {"site": str(context.node_id), "has": True, "error": ""}
        if "site-config" in context.node_config:
            from fedtl.federation.deployment import backbone_query, load_site_config

            site = load_site_config(str(context.node_config["site-config"]))
            status["site"] = site.name
            problem = backbone_query(site, msg.content)
            status["has"] = not problem
            status["error"] = problem
        return Message(RecordDict({"status": ConfigRecord(status)}), reply_to=msg)

    return app
