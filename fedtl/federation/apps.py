"""The Flower ServerApp and ClientApp, built around a config (simulation) or Flower's run config.

``fedtl simulate`` builds both with its resolved config; ``flwr run`` and SuperLink/SuperNode
deployments import the module-level apps in ``server/app.py`` and ``clients/app.py``, which read
``context.run_config``. A SuperNode started with ``--node-config "site-config='site.toml'"`` is a
deployed data site (its own data, budget and ledger); one with ``partition-id``/``num-partitions``
is a simulated site holding a partition of the configured data set.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtl.config import FedTLConfig
from fedtl.errors import FedTLError

log = logging.getLogger(__name__)

FLOWER_KEYS = ()  # run-config keys owned by Flower rather than fedtl (none so far)


def config_from_run_config(run_config, fixed: FedTLConfig | None) -> FedTLConfig:
    return fixed if fixed is not None else FedTLConfig.from_run_config(run_config, ignore=FLOWER_KEYS)


def config_from_context(context: Context, fixed: FedTLConfig | None) -> FedTLConfig:
    return config_from_run_config(context.run_config, fixed)


def make_server_app(cfg: FedTLConfig | None = None, distribute_backbone: bool = True) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtl.federation.logs import quiet_flower, show_progress

        quiet_flower()  # FEDTL_VERBOSE=1 keeps Flower's own lines
        show_progress()  # a deployed ServerApp's round lines reach `flwr run --stream`
        from fedtl.federation.server import run_server  # the ServerApp's alone: a ClientApp never imports it

        run_server(grid, config_from_context(context, cfg), run_id=str(context.run_id),
                   distribute_backbone=distribute_backbone, demo_data=cfg is not None)

    return app


def _from_worker(op: str, msg: Message, context: Context):
    """The reply content from this deployed site's long-lived worker, or None: serve it in this process."""
    from fedtl.federation.worker_link import forward
    from fedtl.site_config import SiteConfig

    path = str(context.node_config["site-config"])
    try:
        site = SiteConfig.load(path)
    except FedTLError:  # reported by the in-process path, the way it always was
        return None
    return forward(op, msg.content, site_config=str(Path(path).resolve()), state_dir=site.state_dir,
                   run_config=context.run_config, run_id=context.run_id, node_id=context.node_id)


def make_client_app(cfg: FedTLConfig | None = None, threads: int = 0) -> ClientApp:
    """The ClientApp. A deployed site (``site-config`` in the node config, no fixed ``cfg``) forwards train,
    personalize and evaluate messages to its site worker (``fedtl.federation.worker``) without importing torch, Opacus or fedtl's
    training code; without a worker that answers, and everywhere else, the handlers run in this process."""
    app = ClientApp()

    def serve(op: str, msg: Message, context: Context) -> Message:
        from fedtl.federation.logs import quiet_flower

        received_at = time.monotonic()
        quiet_flower()  # in a simulation's Ray worker too (idempotent)
        content = None
        if cfg is None and "site-config" in context.node_config:
            content = _from_worker(op, msg, context)
        if content is None:
            from fedtl.federation import handlers

            if op == "train":
                content = handlers.handle_train(msg.content, context.run_config, context.node_config,
                                                context.run_id, cfg=cfg, threads=threads, received_at=received_at)
            elif op == "personalize":
                content = handlers.handle_personalize(msg.content, context.run_config, context.node_config,
                                                      context.node_id, cfg=cfg, threads=threads)
            else:
                content = handlers.handle_evaluate(msg.content, context.run_config, context.node_config,
                                                   context.node_id, cfg=cfg, threads=threads)
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return serve("train", msg, context)

    @app.train("personalize")
    def personalize(msg: Message, context: Context) -> Message:
        """Fine-tune the final global suffix on this site's data under its remaining budget; keep the result in
        its state dir and reply with figures only (``handlers.handle_personalize``)."""
        return serve("personalize", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the server's suffix on this site's own evaluation data (``handlers.handle_evaluate``)."""
        return serve("evaluate", msg, context)

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
