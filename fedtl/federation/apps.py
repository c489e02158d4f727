"""The Flower ServerApp and ClientApp, built around a config (simulation) or Flower's run config.

``fedtl simulate`` builds both with its resolved config; ``flwr run`` and SuperLink/SuperNode
deployments import the module-level apps in ``server/app.py`` and ``clients/app.py``, which read
``context.run_config``. A SuperNode started with ``--node-config "site-config='site.toml'"`` is a
deployed data site (its own data, budget and ledger); one with ``partition-id``/``num-partitions``
is a simulated site holding a partition of the configured data set.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtl.config import FedTLConfig
from fedtl.errors import PrivacyBudgetError
from fedtl.federation.records import to_record, to_state, train_reply
from fedtl.federation.server import run_server
from fedtl.federation.site import build_transfer_model, load_source, simulated_policy, simulated_site_data, train_site

log = logging.getLogger(__name__)

FLOWER_KEYS = ()  # run-config keys owned by Flower rather than fedtl (none so far)


def config_from_context(context: Context, fixed: FedTLConfig | None) -> FedTLConfig:
    return fixed if fixed is not None else FedTLConfig.from_run_config(context.run_config, ignore=FLOWER_KEYS)


def make_server_app(cfg: FedTLConfig | None = None, distribute_backbone: bool = True) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config_from_context(context, cfg), run_id=str(context.run_id),
                   distribute_backbone=distribute_backbone)

    return app


def _site_of(conf: FedTLConfig, context: Context, model):
    """(policy, data) for this node: a deployed site's own, or a simulated partition."""
    node = context.node_config
    if "site-config" in node:
        from fedtl.federation.deployment import deployed_site_data, load_site_config, site_policy

        path = str(node["site-config"])
        return site_policy(load_site_config(path)), deployed_site_data(conf, model, path)
    site, num_sites = int(node["partition-id"]), int(node["num-partitions"])
    return simulated_policy(conf, site), simulated_site_data(conf, model, site, num_sites)


def make_client_app(cfg: FedTLConfig | None = None, threads: int = 0) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if threads:
            torch.set_num_threads(threads)
        conf = config_from_context(context, cfg)
        config = msg.content["config"]
        if "site-config" in context.node_config:
            from fedtl.federation.deployment import load_site_config

            load_site_config(str(context.node_config["site-config"]))  # its weights dir is looked up first
        num_classes = int(config.get("num-classes", 0)) or load_source(conf.data.path).num_classes
        model = build_transfer_model(conf, num_classes)
        pinned = str(config.get("backbone-sha256", ""))
        policy, data = _site_of(conf, context, model)
        base = {"num-examples": len(data.labels), "declined": 1.0, "epsilon": -1.0}
        if pinned and model.weights_sha256 != pinned:
            reason = (f"Site `{policy.name}` holds `{conf.model.backbone}` weights with sha256 "
                      f"{model.weights_sha256[:16]}…, the server pinned {pinned[:16]}…; it will not train.")
            return Message(train_reply(ArrayRecord(), base, site=policy.name, reason=reason), reply_to=msg)
        if len(data.labels) and int(data.labels.max()) >= num_classes:
            reason = f"Site `{policy.name}` has labels outside the federation's {num_classes} classes."
            return Message(train_reply(ArrayRecord(), base, site=policy.name, reason=reason), reply_to=msg)
        model.load_trainable_state(to_state(msg.content["arrays"]))
        try:
            result = train_site(conf, model, data, policy, run_id=str(config.get("run-id", context.run_id)),
                                server_round=int(config["server-round"]), total_rounds=int(config["total-rounds"]))
        except PrivacyBudgetError as exc:  # e.g. an unreadable ledger: never train blind
            log.error("Site %s declines: %s", policy.name, exc)
            return Message(train_reply(ArrayRecord(), base, site=policy.name, reason=str(exc)), reply_to=msg)
        metrics = {"num-examples": result.num_examples, "declined": float(result.declined),
                   "epsilon": result.epsilon, "noise-multiplier": result.noise_multiplier, "steps": result.steps,
                   "train-loss": result.loss, "seconds": result.seconds, "cache-hit": float(data.cache_hit)}
        arrays = ArrayRecord() if result.declined else to_record(model.trainable_state())
        return Message(train_reply(arrays, metrics, site=policy.name, reason=result.reason), reply_to=msg)

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
