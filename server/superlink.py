"""Flower's SuperLink with the Fleet API public and the Control and Runtime APIs on a private address.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``, ``flwr ls``) and the Runtime API (the ServerApp process) on one HTTPS ``--host/--port``
(``--control-api-address`` is deprecated and ignored). In the open-source edition the Control API has
no authentication, and in ``subprocess`` isolation the Runtime API has none either: anyone who reaches
that port can register a key, submit an app (which every SuperNode then runs) or claim the ServerApp's
task. Node authentication protects only the Fleet API.

So this runs Flower's own SuperLink app (``flwr.superlink.main.create_app``, the same lifespan, state,
middleware and TLS) on two sockets of one server:

- the **fleet address** (public, e.g. ``0.0.0.0:9093``) answers only ``/v1/fleet/…`` (SuperNodes,
  authenticated by their registered keys) and ``/health``; every other path is a 404;
- the **control address** (default ``127.0.0.1:9091``; a private address if the operator's ``flwr``
  runs on another machine) answers everything, and is where Flower's SuperExec reaches the Runtime API.

Which socket a request came in on is the connection's local address (``scope["server"]``), not
anything the client sends. Usage (``server.ops start-superlink`` builds this)::

    python -m server.superlink --fleet-address 0.0.0.0:9093 --control-address 127.0.0.1:9091 \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key --enable-supernode-auth ...

Every option after the two addresses is ``flower-superlink``'s own (``--host/--port`` excepted).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fedtl.errors import ConfigError

DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9091"
PUBLIC_PREFIXES = ("/v1/fleet/",)  # the Fleet API: all a SuperNode calls (flwr/supernode/fleet_http_client.py)
PUBLIC_PATHS = ("/health",)
# Flower starts legacy gRPC Control / Fleet servers on their default public addresses when these are set.
_LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def split_address(address: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → ``(host, port)``."""
    host, sep, port = (address or "").rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"`{what}` must be host:port (e.g. 127.0.0.1:9091), got {address!r}.")
    return host, int(port)


def check_control_host(host: str) -> None:
    """The Control API has no authentication in Flower 1.41 OSS: only loopback or a private IP address."""
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or ip.is_unspecified or not (ip.is_loopback or ip.is_private):
        raise ConfigError(
            f"The Control API address must be loopback or a private IP address, got {host!r}: Flower 1.41's "
            "Control API (register keys, submit apps) has no authentication, so it must not be reachable from "
            "the networks the sites use. Keep the default 127.0.0.1 and run `flwr` on the server (or through "
            "an SSH tunnel), or give the server's address on a private operator network.")


class FleetOnlyOnPublicPort:
    """ASGI wrapper: requests that arrived on ``public_port`` reach only the Fleet API and health checks."""

    def __init__(self, app: ASGIApp, public_port: int) -> None:
        self.app, self.public_port = app, public_port

    def allows(self, scope: Scope) -> bool:
        server = scope.get("server") or (None, None)
        if scope.get("type") == "lifespan" or server[1] != self.public_port:
            return True
        path = scope.get("path", "")
        if "/." in path or "//" in path:  # no dot segments or doubled slashes, decoded or not
            return False
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if self.allows(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            body = json.dumps({"detail": "Not Found: only the Fleet API is served on this port"}).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        else:  # websocket
            await send({"type": "websocket.close", "code": 1008})


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on ``host:port``; a port in use is a one-line ConfigError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"Cannot listen on the {what} {host}:{port}: {exc.strerror or exc}.") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.superlink", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet-address", required=True, help="public host:port for SuperNodes (Fleet API only)")
    parser.add_argument("--control-address", default=DEFAULT_CONTROL_ADDRESS,
                        help=f"loopback or private host:port for flwr and the ServerApp (default {DEFAULT_CONTROL_ADDRESS})")
    args, flower_args = parser.parse_known_args(argv)
    try:
        fleet_host, fleet_port = split_address(args.fleet_address, "--fleet-address")
        control_host, control_port = split_address(args.control_address, "--control-address")
        check_control_host(control_host)
        if fleet_port == control_port:
            raise ConfigError(f"The fleet and control addresses need different ports, got {fleet_port} for both.")
        if {"--host", "--port"} & {a.split("=")[0] for a in flower_args}:
            raise ConfigError("Pass --fleet-address / --control-address, not flower-superlink's --host / --port.")
        sockets = [bind(control_host, control_port, "control address"), bind(fleet_host, fleet_port, "fleet address")]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for name in _LEGACY_GRPC_ENV:
        os.environ.pop(name, None)
    # Flower starts `flower-superexec` by name: the one installed next to this interpreter, venv active or not
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "flower-superexec")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return serve(flower_args, control_host, control_port, fleet_port, sockets, fleet_host=fleet_host)


def banner(fleet_host: str, fleet_port: int, control_host: str, control_port: int) -> str:
    """The start-up line: where each API listens, as bound (a loopback fleet address is not called public)."""
    def show(h: str) -> str:
        return f"[{h}]" if ":" in h else (h or "*")

    reach = ("every interface" if fleet_host in ("0.0.0.0", "::", "")
             else "this machine only" if fleet_host in ("127.0.0.1", "localhost", "::1") else "for the sites")
    return (f"fedtl SuperLink: Fleet API on {show(fleet_host)}:{fleet_port} ({reach}), Control and Runtime APIs on "
            f"{show(control_host)}:{control_port} only")


def serve(flower_args: list[str], control_host: str, control_port: int, fleet_port: int,
          sockets: list[socket.socket], fleet_host: str = "") -> int:
    """Flower's SuperLink app, configured from ``flower_args`` with the control address as its own, on ``sockets``.

    Returns when the server stops: 0, or 3 (uvicorn's code) when the app failed to start.
    """
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    sys.argv = ["flower-superlink", *flower_args, "--host", control_host, "--port", str(control_port)]
    config = _parse_superlink_lifespan_config()  # Flower's own parsing and checks (TLS, node auth, isolation)
    app = FleetOnlyOnPublicPort(create_app(config, SuperLinkLifespan), fleet_port)
    print(banner(fleet_host, fleet_port, control_host, control_port), file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(
        app, host=control_host, port=control_port, workers=1, access_log=True, lifespan="on",
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
    ))
    server.run(sockets=sockets)
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
