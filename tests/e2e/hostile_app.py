"""A hostile ClientApp for the e2e tests: site 0 of a simulation attacks, one attack per round.

    python -m tests.e2e.hostile_app CONFIG_JSON OUT_DIR [--clean]

Runs the real ServerApp (``make_server_app``) and, for every other site, the real ClientApp, on
Flower's simulation runtime. Site 0 trains honestly (the real ClientApp) and then rewrites its reply:
round r uses ``ATTACKS[(r - 1) % len(ATTACKS)]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

ATTACKS = ("sign_flip", "scale", "huge_weight", "nan", "noise", "label_flip", "stale", "bad_metrics")


def hostile_client_app(cfg) -> ClientApp:
    from fedtl.federation.apps import make_client_app
    from fedtl.federation.records import to_record, to_state

    honest = make_client_app(cfg, threads=1)
    app = ClientApp()
    stale: dict = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) != 0:
            return honest(msg, context)
        rnd = int(msg.content["config"]["server-round"])
        attack = ATTACKS[(rnd - 1) % len(ATTACKS)]
        g = to_state(msg.content["arrays"])
        if attack == "label_flip":  # gradient ascent on its own data: the update of flipped labels
            reply = honest(msg, context)
            w = to_state(reply.content["arrays"])
            reply.content["arrays"] = to_record({k: g[k] - 3 * (w[k] - g[k]) for k in w})
            return reply
        reply = honest(msg, context)
        w = to_state(reply.content["arrays"])
        metrics = dict(reply.content["metrics"])
        if attack == "sign_flip":
            w = {k: g[k] - 100 * (w[k] - g[k]) for k in w}
        elif attack == "scale":
            w = {k: 1e6 * v for k, v in w.items()}
        elif attack == "huge_weight":
            w, metrics["num-examples"] = {k: torch.full_like(v, -50.0) for k, v in w.items()}, 1e12
        elif attack == "nan":
            w = {k: v.clone().fill_(float("nan")) for k, v in w.items()}
        elif attack == "noise":
            w = {k: g[k] + torch.randn_like(v) for k, v in w.items()}
        elif attack == "stale":
            stale.setdefault("w", {k: v.clone() for k, v in w.items()})
            w = stale["w"]
        elif attack == "bad_metrics":
            metrics["epsilon"] = [1.0, 2.0]
            metrics["surprise"] = 1.0
        reply.content["arrays"] = to_record(w)
        reply.content["metrics"] = MetricRecord(metrics)
        return reply

    return app


def main() -> int:
    import os
    import warnings

    from flwr.simulation import run_simulation

    from fedtl.config import FedTLConfig
    from fedtl.federation.apps import make_client_app, make_server_app

    cfg = FedTLConfig.from_run_config(json.loads(Path(sys.argv[1]).read_text()))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    client = make_client_app(cfg, threads=1) if "--clean" in sys.argv else hostile_client_app(cfg)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "logging_level": "error"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=make_server_app(cfg, distribute_backbone=False), client_app=client,
                       num_supernodes=cfg.federation.sites, backend_config=backend)
    try:
        import ray

        ray.shutdown()
    except ImportError:
        pass
    return 0 if (Path(cfg.output.dir) / "summary.json").exists() else 1


if __name__ == "__main__":
    sys.exit(main())
