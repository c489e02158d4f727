"""The SuperLink split: the public port answers only the Fleet API; the Control API stays on loopback / private.

Requests are hand-built ASGI scopes, as uvicorn delivers them (``server`` is the socket's own address).
The real processes are exercised in tests/e2e/test_deployment_tls.py.
"""

import asyncio

import pytest

from fedtl.errors import ConfigError
from server import ops
from server.superlink import FleetOnlyOnPublicPort, banner, check_control_host, main, split_address

PUBLIC, CONTROL = 9093, 9091


def _call(path: str, port: int, kind: str = "http") -> tuple[int | None, bool]:
    """(status sent by the wrapper or None, whether the inner app was reached)."""
    reached, sent = [], []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": kind, "path": path, "server": ("0.0.0.0", port), "client": ("203.0.113.9", 5555)}
    asyncio.run(FleetOnlyOnPublicPort(inner, PUBLIC)(scope, receive, send))
    status = next((m.get("status") for m in sent if m["type"] == "http.response.start"), None)
    if kind == "websocket" and sent:
        status = sent[0]["type"]
    return status, bool(reached)


@pytest.mark.parametrize("path", ["/v1/fleet/pull-messages", "/v1/fleet/activate-node", "/health"])
def test_the_public_port_serves_the_fleet_api(path):
    assert _call(path, PUBLIC) == (None, True)


@pytest.mark.parametrize("path", [
    "/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",  # register a key, submit an app
    "/v1/runtime/acquire-task", "/v1/runtime/pull-messages",  # act as the ServerApp
    "/docs", "/openapi.json", "/", "",
    "/v1/fleet/../control/list-runs", "/v1/fleet/./x", "//v1/fleet/x", "/v1/fleetx", "/V1/fleet/x",
])
def test_the_public_port_refuses_everything_else_without_reaching_flower(path):
    assert _call(path, PUBLIC) == (404, False)
    assert _call(path, PUBLIC, "websocket") == ("websocket.close", False)


def test_the_control_port_and_lifespan_reach_flower_unchanged():
    assert _call("/v1/control/list-runs", CONTROL) == (None, True)
    assert _call("/v1/runtime/acquire-task", CONTROL) == (None, True)
    assert _call("", PUBLIC, "lifespan") == (None, True)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "10.1.2.3", "192.168.0.5", "fd00::5"])
def test_loopback_and_private_control_hosts_are_accepted(host):
    check_control_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "1.2.3.4", "2001:4860::8888", "server.example.org"])
def test_public_or_unspecified_control_hosts_are_refused(host):
    with pytest.raises(ConfigError, match=f"must be loopback or a private IP address, got '{host}'.*no authentication"):
        check_control_host(host)


def test_addresses_parse_with_ipv6_brackets_and_bad_ones_are_named():
    assert split_address("[::1]:9091", "x") == ("::1", 9091) and split_address("0.0.0.0:9093", "x") == ("0.0.0.0", 9093)
    for bad in ("9091", "host:", ":9091", "h:0", "h:70000", "h:port"):
        with pytest.raises(ConfigError, match=f"`--control-address` must be host:port .*got '{bad}'"):
            split_address(bad, "--control-address")


def test_superlink_command_splits_fleet_and_control(tmp_path):
    certs = ops.make_ca_and_server_cert(tmp_path / "certs")
    cmd = ops.superlink_command(tmp_path / "certs", "0.0.0.0", 9093)
    assert cmd[1:3] == ["-m", "server.superlink"]
    assert cmd[cmd.index("--fleet-address") + 1] == "0.0.0.0:9093"
    assert cmd[cmd.index("--control-address") + 1] == "127.0.0.1:9091"
    assert "--host" not in cmd and "--port" not in cmd and "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert.resolve())
    private = ops.superlink_command(tmp_path / "certs", "::", 9093, control_address="10.0.0.5:9191")
    assert private[private.index("--fleet-address") + 1] == "[::]:9093"
    with pytest.raises(ConfigError, match="must be loopback or a private IP address, got '0.0.0.0'"):
        ops.superlink_command(tmp_path / "certs", "0.0.0.0", 9093, control_address="0.0.0.0:9091")
    with pytest.raises(ConfigError, match="must differ, got 9093 for both"):
        ops.superlink_command(tmp_path / "certs", "0.0.0.0", 9093, control_address="127.0.0.1:9093")


@pytest.mark.parametrize("argv,fragment", [
    (["--fleet-address", "0.0.0.0:9093", "--control-address", "0.0.0.0:9091"], "must be loopback or a private IP"),
    (["--fleet-address", "0.0.0.0:9093", "--control-address", "127.0.0.1:9093"], "need different ports"),
    (["--fleet-address", "0.0.0.0:9093", "--host", "0.0.0.0"], "not flower-superlink's --host / --port"),
    (["--fleet-address", "nowhere"], "`--fleet-address` must be host:port"),
])
def test_the_runner_refuses_a_public_control_api_with_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


def test_a_port_in_use_is_one_line(capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["--fleet-address", "127.0.0.1:9", "--control-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: Cannot listen on the control address 127.0.0.1:{port}: ") and "\n" not in err


def test_the_start_up_line_says_where_each_api_listens_as_bound():
    """A Fleet API bound to loopback was announced as "(public)"; the line now names the address it is bound to."""
    assert banner("0.0.0.0", 9093, "127.0.0.1", 9091) == ("fedtl SuperLink: Fleet API on 0.0.0.0:9093 (every interface), "
                                                          "Control and Runtime APIs on 127.0.0.1:9091 only")
    assert "Fleet API on 127.0.0.1:9093 (this machine only)" in banner("127.0.0.1", 9093, "127.0.0.1", 9091)
    assert "Fleet API on 10.0.0.5:9093 (for the sites), Control and Runtime APIs on [::1]:9091 only" in \
        banner("10.0.0.5", 9093, "::1", 9091)
