"""ClientApp entry point (``flwr run`` / SuperNode deployments): reads Flower's run config."""

from fedtl.federation.apps import make_client_app

app = make_client_app()
