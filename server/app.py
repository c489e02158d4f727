"""ServerApp entry point (``flwr run`` / SuperLink deployments): reads Flower's run config."""

from fedtl.federation.apps import make_server_app

app = make_server_app()
