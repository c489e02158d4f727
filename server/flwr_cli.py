"""Flower's command lines and CLI, wrapped: the SuperLink / SuperNode commands, ``$FLWR_HOME`` connections,
``flwr supernode register / unregister / list`` and ``flwr ls`` (JSON replies parsed, errors made readable).

A TLS connection in ``$FLWR_HOME/config.toml`` is ``address`` plus an absolute ``root-certificates``
path (no ``insecure``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib as tomli  # stdlib reader (Python 3.11+)
import tomli_w  # tomli and tomli-w are dependencies of flwr

from fedtl.errors import ConfigError, FederationError
from server import site_names
from server.certs import CA_CERT, SERVER_CERT, SERVER_KEY, _check_name
from server.superlink import DEFAULT_CONTROL_ADDRESS, check_control_host, split_address

_FLWR_TIMEOUT_S = 60.0


def _executable(name: str) -> str:
    """The Flower executable next to this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` not found next to {sys.executable} nor on PATH; install flwr (pip install -e .).")
    return found


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(f"{what} `{path}` does not exist or is not a file.")
    return p


def _check_port(port: int, what: str = "port") -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"`{what}` must be an integer in 1..65535, got {port!r}.")
    return port


def superlink_command(certs_dir: str | os.PathLike[str], host: str, port: int,
                      state_db: str | os.PathLike[str] | None = None, *,
                      control_address: str = DEFAULT_CONTROL_ADDRESS) -> list[str]:
    """The SuperLink command line of a TLS deployment with SuperNode authentication.

    SuperNodes connect to ``host:port`` (the Fleet API, the only API served there);
    ``control_address`` (loopback by default, or a private address) serves the Control API that
    ``flwr`` and the connection written by ``write-connection`` use, and the Runtime API the
    ServerApp uses. Flower 1.41 itself would serve all three on one port, the Control API
    without authentication: ``server/superlink.py`` runs Flower's SuperLink app split this way.
    Uses ``certs_dir``'s ``ca.crt``, ``server.crt`` and ``server.key`` (the certificate must name
    both hosts); ``state_db`` (a SQLite path) keeps runs and registered SuperNodes across
    restarts (in memory when ``None``). Runtime dependency installation stays off: fedtl is
    installed at the server in advance.
    """
    control_host, control_port = split_address(control_address, "control address")
    check_control_host(control_host)
    if control_port == _check_port(port):
        raise ConfigError(f"The fleet port and the control port must differ, got {port} for both.")
    certs = Path(certs_dir)
    fleet_host = f"[{host}]" if ":" in str(host) else str(host)
    cmd = [
        sys.executable, "-m", "server.superlink",
        "--fleet-address", f"{fleet_host}:{port}",
        "--control-address", control_address,
        "--ssl-ca-certfile", str(_existing_file(certs / CA_CERT, "CA certificate")),
        "--ssl-certfile", str(_existing_file(certs / SERVER_CERT, "Server certificate")),
        "--ssl-keyfile", str(_existing_file(certs / SERVER_KEY, "Server private key")),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--isolation", "subprocess",
    ]
    if state_db is not None:
        cmd += ["--database", str(Path(state_db).expanduser().resolve())]
    return cmd


def supernode_command(superlink_address: str, ca_cert: str | os.PathLike[str] | None,
                      private_key: str | os.PathLike[str], clientappio_port: int, node_config: str,
                      *, clientappio_host: str = "127.0.0.1", max_retries: int | None = None,
                      max_wait_time: float | None = None) -> list[str]:
    """The ``flower-supernode`` command line of one data site (TLS + SuperNode authentication).

    ``ca_cert`` verifies the SuperLink's certificate (``--root-certificates``; ``None`` falls back
    to the system's CA store, which does not trust a private CA). ``private_key`` is the site's
    OpenSSH private key. ``clientappio_port`` is this SuperNode's own ClientAppIo/Runtime API
    port (one per SuperNode on a host). ``node_config`` is passed verbatim to ``--node-config``,
    e.g. ``"site-config='/srv/site.toml'"`` or ``"partition-id=0 num-partitions=3"``.
    ``max_retries`` / ``max_wait_time`` bound the reconnection attempts (unbounded by default).
    """
    if not re.match(r"^\[?[A-Za-z0-9_.:-]+\]?:\d+$", superlink_address or ""):
        raise ConfigError(f"SuperLink address must be host:port, got `{superlink_address}`.")
    cmd = [_executable("flower-supernode"), "--superlink", superlink_address]
    if ca_cert is not None:
        cmd += ["--root-certificates", str(_existing_file(ca_cert, "CA certificate"))]
    cmd += [
        "--auth-supernode-private-key", str(_existing_file(private_key, "SuperNode private key")),
        "--isolation", "subprocess",
        "--host", clientappio_host,
        "--port", str(_check_port(clientappio_port, "clientappio_port")),
        "--node-config", node_config,
    ]
    if max_retries is not None:
        cmd += ["--max-retries", str(int(max_retries))]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(float(max_wait_time))]
    return cmd


# ---------------------------------------------------------------------------------------------
# Flower CLI configuration and wrappers
# ---------------------------------------------------------------------------------------------


def _flwr_home(flwr_home: str | os.PathLike[str] | None) -> Path:
    if flwr_home is not None:
        return Path(flwr_home).expanduser()
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(flwr_home: str | os.PathLike[str] | None, name: str, address: str,
                     ca_cert: str | os.PathLike[str], *, make_default: bool = True) -> Path:
    """Add (or replace) a TLS SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``.

    The connection is ``address = "host:port"`` plus ``root-certificates`` (the CA certificate,
    as the absolute path Flower requires); it is not ``insecure``. Other connections in the file
    are kept; with ``make_default`` the connection becomes ``[superlink] default``. Returns the
    path of config.toml.
    """
    _check_name(name, "connection name")
    if not re.match(r"^\[?[A-Za-z0-9_.:-]+\]?:\d+$", address or ""):
        raise ConfigError(f"SuperLink address must be host:port, got `{address}`.")
    ca = _existing_file(ca_cert, "CA certificate")
    home = _flwr_home(flwr_home)
    path = home / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomli.loads(path.read_text(encoding="utf-8"))
        except (tomli.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"`{path}` is not valid TOML ({err}); fix or move it first.") from err
    superlink = data.setdefault("superlink", {})
    if not isinstance(superlink, dict):
        raise ConfigError(f"`{path}`: `superlink` must be a table.")
    superlink[name] = {"address": address, "root-certificates": str(ca)}
    if make_default or "default" not in superlink:
        superlink["default"] = name
    # `default` first, then the connections, for a file people can read.
    data["superlink"] = {"default": superlink.pop("default"), **superlink}
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _parse_json_output(stdout: str) -> Any:
    text = stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        if start < 0:
            raise
        return json.JSONDecoder().raw_decode(text[start:])[0]


def _flwr_json(flwr_home: str | os.PathLike[str] | None, args: Sequence[str], what: str,
               timeout: float = _FLWR_TIMEOUT_S) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` with FLWR_HOME set; the parsed reply or FederationError."""
    env = dict(os.environ, FLWR_HOME=str(_flwr_home(flwr_home)), FLWR_TELEMETRY_ENABLED="0")
    env.setdefault("NO_COLOR", "1")
    cmd = [_executable("flwr"), *args, "--format", "json"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise FederationError(f"{what}: `{' '.join(cmd)}` did not answer within {timeout:.0f} s.") from err
    try:
        reply = _parse_json_output(proc.stdout)
    except json.JSONDecodeError:
        reply = None
    # In JSON mode flwr reports most errors as {"success": false, ...} with exit status 0.
    if proc.returncode != 0 or not isinstance(reply, dict) or reply.get("success") is False:
        detail = reply.get("error-message") if isinstance(reply, dict) else None
        detail = " ".join(str(detail or proc.stderr or proc.stdout or "no output").split())
        raise FederationError(f"{what} failed (flwr exit status {proc.returncode}): {detail}")
    return reply


def register_site(flwr_home: str | os.PathLike[str] | None, connection: str,
                  public_key_path: str | os.PathLike[str], name: str | None = None) -> int:
    """Register a site's SuperNode public key with the SuperLink; returns the new node id.

    Wraps ``flwr supernode register <public-key> <connection> [--name NAME]``. Only SuperNodes
    whose key is registered can connect when the SuperLink runs with ``--enable-supernode-auth``.
    Raises FederationError (with flwr's message) when the SuperLink refuses or is unreachable.
    The key's fingerprint, the site's name (``name``, else the key's comment, else the file's stem) and
    the node id are recorded in ``$FLWR_HOME/fedtl-sites.json`` for :func:`list_sites`.
    """
    key = _existing_file(public_key_path, "Public key")
    args = ["supernode", "register", str(key), connection]
    if name is not None:
        args += ["--name", _check_name(name)]
    reply = _flwr_json(flwr_home, args, f"Registering `{key.name}` at `{connection}`")
    node_id = int(reply["node-id"])
    site_names.record(_flwr_home(flwr_home), connection, key, node_id, name)
    return node_id


def unregister_site(flwr_home: str | os.PathLike[str] | None, connection: str, node_id: int) -> None:
    """Unregister SuperNode ``node_id`` (``flwr supernode unregister``); it can no longer connect.

    Flower 1.41 unregisters by node id (from :func:`register_site` or :func:`list_sites`), not by key.
    """
    _flwr_json(flwr_home, ["supernode", "unregister", str(int(node_id)), connection],
               f"Unregistering node {node_id} at `{connection}`")
    site_names.forget(_flwr_home(flwr_home), connection, node_id)


def list_sites(flwr_home: str | os.PathLike[str] | None, connection: str) -> list[dict[str, Any]]:
    """The SuperNodes known to the SuperLink (``flwr supernode list --format json``).

    Each entry has ``node-id``, ``status`` (``registered``, ``online``, ``offline``,
    ``unregistered``), ``online-at``, ``offline-at``, ..., and ``site-name`` / ``key-fingerprint`` for
    nodes registered through :func:`register_site` from this ``$FLWR_HOME``.
    """
    reply = _flwr_json(flwr_home, ["supernode", "list", connection], f"Listing SuperNodes at `{connection}`")
    return site_names.annotate(_flwr_home(flwr_home), connection, list(reply.get("nodes", [])))


def run_status(flwr_home: str | os.PathLike[str] | None, connection: str) -> list[dict[str, Any]]:
    """The runs on the SuperLink (``flwr ls --format json``): ``run-id``, ``status``, ``elapsed``, ..."""
    reply = _flwr_json(flwr_home, ["ls", connection], f"Listing runs at `{connection}`")
    return list(reply.get("runs", []))

