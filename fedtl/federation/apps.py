"""The Flower ServerApp and ClientApp, built around a config (simulation) or Flower's run config.

``fedtl simulate`` builds both with its resolved config; ``flwr run`` imports the module-level
apps in ``server/app.py`` and ``clients/app.py``, which read ``context.run_config``.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtl.config import FedTLConfig
from fedtl.errors import PrivacyBudgetError
from fedtl.federation.records import to_record, to_state, train_reply
from fedtl.federation.server import run_server
from fedtl.federation.site import build_transfer_model, load_source, simulated_site_data, train_site

log = logging.getLogger(__name__)

FLOWER_KEYS = ()  # run-config keys owned by Flower rather than fedtl (none so far)


def config_from_context(context: Context, fixed: FedTLConfig | None) -> FedTLConfig:
    return fixed if fixed is not None else FedTLConfig.from_run_config(context.run_config, ignore=FLOWER_KEYS)


def make_server_app(cfg: FedTLConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config_from_context(context, cfg), run_id=str(context.run_id))

    return app


def make_client_app(cfg: FedTLConfig | None = None, threads: int = 0) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if threads:
            torch.set_num_threads(threads)
        conf = config_from_context(context, cfg)
        site = int(context.node_config["partition-id"])
        num_sites = int(context.node_config["num-partitions"])
        source = load_source(conf.data.path)
        model = build_transfer_model(conf, source.num_classes)
        model.load_trainable_state(to_state(msg.content["arrays"]))
        data = simulated_site_data(conf, model, site, num_sites)
        config = msg.content["config"]
        try:
            result = train_site(conf, model, data, site, run_id=str(config.get("run-id", context.run_id)),
                                server_round=int(config["server-round"]), total_rounds=int(config["total-rounds"]))
        except PrivacyBudgetError as exc:  # e.g. an unreadable ledger: never train blind
            log.error("Site %d declines: %s", site, exc)
            metrics = {"num-examples": len(data.labels), "site": site, "declined": 1.0, "epsilon": -1.0}
            return Message(train_reply(ArrayRecord(), metrics, reason=str(exc)), reply_to=msg)
        metrics = {"num-examples": result.num_examples, "site": site, "declined": float(result.declined),
                   "epsilon": result.epsilon, "noise-multiplier": result.noise_multiplier, "steps": result.steps,
                   "train-loss": result.loss, "seconds": result.seconds, "cache-hit": float(data.cache_hit)}
        arrays = ArrayRecord() if result.declined else to_record(model.trainable_state())
        return Message(train_reply(arrays, metrics, reason=result.reason), reply_to=msg)

    return app
