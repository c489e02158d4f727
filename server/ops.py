"""What the aggregation-server operator runs: TLS certificates, SuperNode keys, the SuperLink.

A deployment is one SuperLink (SuperNode authentication on; the Fleet API on a public TLS port, the
Control and Runtime APIs on a loopback or private one: see ``server/superlink.py``) and one SuperNode
per data site. The operator

1. creates a CA and a server certificate (``certs``) and gives ``ca.crt`` to every site;
2. receives each site's public key (a site creates its pair with ``site-keys``) and registers it
   (``register``); a SuperNode whose key was never registered is refused;
3. starts the SuperLink (``start-superlink``) and submits runs with ``flwr run . <connection>``.

Key formats (Flower 1.41): SuperNode keys are NIST elliptic-curve keys (P-384 here) in OpenSSH
format -- ``<name>.key`` is an unencrypted OpenSSH private key (``--auth-supernode-private-key``),
``<name>.pub`` the one-line ``ecdsa-sha2-nistp384 ...`` public key (``flwr supernode register``).
A TLS connection in ``$FLWR_HOME/config.toml`` is ``address`` plus an absolute
``root-certificates`` path (no ``insecure``).

Usage: ``python -m server.ops {certs,site-keys,write-connection,start-superlink,register,
unregister,sites,status} ...`` (``--help`` on each).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import tomllib as tomli  # stdlib reader (Python 3.11+)
import tomli_w  # tomli and tomli-w are dependencies of flwr

from fedtl.errors import ConfigError, FedTLError, FederationError
from server.superlink import DEFAULT_CONTROL_ADDRESS, check_control_host, split_address

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FLWR_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# Certificates and keys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCerts:
    """Paths of the files written by :func:`make_ca_and_server_cert`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(
            f"Refusing to overwrite existing file(s): {', '.join(existing)}. "
            "Move them away or choose another output folder."
        )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (never overwriting; the mode applies from the first byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (for 0644) kept it; be exact
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def _san_entries(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    entries: list[Any] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise ConfigError("Empty host name in the certificate's host list.")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def make_ca_and_server_cert(out_dir: str | os.PathLike[str], hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                            days: int = 365) -> ServerCerts:
    """Create a private CA and a SuperLink server certificate signed by it.

    Writes ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` (PEM; EC P-256 keys, private
    keys mode 0600) into ``out_dir`` (created if missing). The server certificate carries a
    subjectAltName for every entry of ``hosts`` (IP addresses as IP SANs, names as DNS SANs);
    SuperNodes and ``flwr`` must address the SuperLink by one of them. Sites get ``ca.crt`` only.

    Raises:
        ConfigError: ``days`` < 1, no hosts, or any of the four files already exists (nothing is
            written then).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if int(days) < 1:
        raise ConfigError(f"Certificate validity `days` must be >= 1, got {days}.")
    hosts = [str(h) for h in hosts]
    if not hosts:
        raise ConfigError("At least one host (IP address or DNS name) is needed for the server certificate.")
    sans = _san_entries(hosts)
    out = Path(out_dir)
    files = ServerCerts(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    _refuse_existing([files.ca_cert, files.ca_key, files.server_cert, files.server_key])
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=int(days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtl"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedtl deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtl"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    _write_new(files.ca_key, key_pem(ca_key), 0o600)
    _write_new(files.server_key, key_pem(server_key), 0o600)
    _write_new(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("Wrote CA and server certificate for %s to %s (valid %d days)", ", ".join(hosts), out, days)
    return files


def _check_name(name: str, what: str = "site name") -> str:
    if not _NAME_RE.match(name or ""):
        raise ConfigError(f"Invalid {what} `{name}`: use 1-64 letters, digits, `_`, `.` or `-`, "
                          "starting with a letter or digit.")
    return name


def make_site_keypair(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create a site's SuperNode authentication key pair in the format Flower 1.41 expects.

    ``<name>.key``: EC P-384 private key, unencrypted OpenSSH format (mode 0600), for
    ``flower-supernode --auth-supernode-private-key``. ``<name>.pub``: the OpenSSH public key
    line (``ecdsa-sha2-nistp384 AAAA... <name>``) the operator passes to
    ``flwr supernode register``. Returns ``(private_key_path, public_key_path)``.

    Raises:
        ConfigError: an invalid name, or either file already exists.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _check_name(name)
    out = Path(out_dir)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    _refuse_existing([private_path, public_path])
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(private_path, private, 0o600)
    _write_new(public_path, public + f" {name}\n".encode(), 0o644)
    return private_path, public_path


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


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
    """
    key = _existing_file(public_key_path, "Public key")
    args = ["supernode", "register", str(key), connection]
    if name is not None:
        args += ["--name", _check_name(name)]
    reply = _flwr_json(flwr_home, args, f"Registering `{key.name}` at `{connection}`")
    return int(reply["node-id"])


def unregister_site(flwr_home: str | os.PathLike[str] | None, connection: str, node_id: int) -> None:
    """Unregister SuperNode ``node_id`` (``flwr supernode unregister``); it can no longer connect.

    Flower 1.41 unregisters by node id (from :func:`register_site` or :func:`list_sites`), not by key.
    """
    _flwr_json(flwr_home, ["supernode", "unregister", str(int(node_id)), connection],
               f"Unregistering node {node_id} at `{connection}`")


def list_sites(flwr_home: str | os.PathLike[str] | None, connection: str) -> list[dict[str, Any]]:
    """The SuperNodes known to the SuperLink (``flwr supernode list --format json``).

    Each entry has ``node-id``, ``status`` (``registered``, ``online``, ``offline``,
    ``unregistered``), ``online-at``, ``offline-at``, ...
    """
    reply = _flwr_json(flwr_home, ["supernode", "list", connection], f"Listing SuperNodes at `{connection}`")
    return list(reply.get("nodes", []))


def run_status(flwr_home: str | os.PathLike[str] | None, connection: str) -> list[dict[str, Any]]:
    """The runs on the SuperLink (``flwr ls --format json``): ``run-id``, ``status``, ``elapsed``, ..."""
    reply = _flwr_json(flwr_home, ["ls", connection], f"Listing runs at `{connection}`")
    return list(reply.get("runs", []))


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once ``host:port`` accepts a TCP connection, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


class ManagedProcess:
    """A command in its own process group, logged to a file, always stopped on exit.

    ``with ManagedProcess(cmd, log_path, port=9092) as p:`` starts ``cmd`` (stdout and stderr to
    ``log_path``), waits until ``host:port`` accepts TCP connections (when ``port`` is given) and
    raises FederationError, after stopping it, if the process exits first or ``start_timeout``
    passes. On leaving the block -- normally or by an exception -- the whole process group (and
    any descendant that left it) gets SIGTERM, then SIGKILL after ``stop_timeout`` seconds.
    """

    def __init__(self, cmd: Sequence[str], log_path: str | os.PathLike[str], *, port: int | None = None,
                 host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, start_timeout: float = 60.0,
                 stop_timeout: float = 10.0) -> None:
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log_path)
        self.port, self.host = port, host
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (its process group id as well)."""
        if self.proc is None:
            raise RuntimeError("process not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited, else None."""
        return None if self.proc is None else self.proc.poll()

    def poll(self) -> int | None:
        """Same as :attr:`returncode`."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit (``subprocess.TimeoutExpired`` after ``timeout``)."""
        if self.proc is None:
            raise RuntimeError("process not started")
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> ManagedProcess:
        """Start the command and wait for its port; stops it again if it does not come up."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        except OSError as err:
            self.stop()
            raise FederationError(f"Could not start `{self.cmd[0]}`: {err}") from err
        if self.port is None:
            return self
        try:
            deadline = time.monotonic() + self.start_timeout
            while not wait_for_port(self.host, self.port, 0.5):
                if self.proc.poll() is not None:
                    raise FederationError(
                        f"`{Path(self.cmd[0]).name}` exited with status {self.proc.returncode} before "
                        f"{self.host}:{self.port} opened; log {self.log_path}: {self._tail()}")
                if time.monotonic() > deadline:
                    raise FederationError(
                        f"`{Path(self.cmd[0]).name}` did not open {self.host}:{self.port} within "
                        f"{self.start_timeout:.0f} s; log {self.log_path}: {self._tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _tail(self, n: int = 600) -> str:
        return " ".join(self.log_text()[-n:].split())

    def stop(self) -> int | None:
        """Terminate, then kill, the process group and every descendant; returns the exit status."""
        try:
            if self.proc is not None:
                terminate_tree(self.proc, self.stop_timeout)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return None if self.proc is None else self.proc.poll()

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def terminate_tree(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """Stop ``proc`` (started with ``start_new_session=True``), its process group and descendants.

    SIGTERM first (Flower's processes shut down cleanly on it), SIGKILL to whatever is left after
    ``timeout`` seconds. Descendants that left the group (Flower's SuperExec starts its own
    session) are found with psutil when it is installed. Returns the exit status of ``proc``.
    """
    descendants = _descendants(proc.pid)
    if proc.poll() is None or descendants:
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_all(descendants, signal.SIGTERM)
        deadline = time.monotonic() + timeout  # one grace period for the whole tree, not one per process
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        descendants = _wait_all(descendants, max(0.0, deadline - time.monotonic()))
        _signal_group(proc.pid, signal.SIGKILL)
        _signal_all(descendants, signal.SIGKILL)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("Process %s did not exit after SIGKILL", proc.pid)
        _wait_all(descendants, timeout)
    return proc.poll()


def _descendants(pid: int) -> list[Any]:
    """``psutil.Process`` objects of every descendant of ``pid`` (empty without psutil)."""
    try:
        import psutil
    except ImportError:  # the process group still covers children that did not setsid()
        return []
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _signal_all(procs: Sequence[Any], sig: signal.Signals) -> None:
    import psutil  # only reached with a non-empty list, i.e. psutil present

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)  # psutil checks the pid was not reused


def _wait_all(procs: Sequence[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` s for ``procs`` to exit; returns those still alive."""
    if not procs:
        return []
    import psutil

    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    return list(alive)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("certs", help="create ca.crt/ca.key/server.crt/server.key")
    c.add_argument("out_dir")
    c.add_argument("--host", action="append", dest="hosts",
                   help="IP or DNS name the SuperLink is reached at (repeat; default 127.0.0.1 and localhost)")
    c.add_argument("--days", type=int, default=365)

    k = sub.add_parser("site-keys", help="create a site's SuperNode key pair <name>.key / <name>.pub")
    k.add_argument("out_dir")
    k.add_argument("name")

    w = sub.add_parser("write-connection", help="add a TLS connection to $FLWR_HOME/config.toml")
    w.add_argument("name")
    w.add_argument("address", help="host:port of the SuperLink")
    w.add_argument("--ca", required=True, help="CA certificate (ca.crt)")
    w.add_argument("--flwr-home", default=None)

    s = sub.add_parser("start-superlink", help="run the SuperLink (TLS, SuperNode auth) in the foreground")
    s.add_argument("--certs", required=True, help="folder with ca.crt, server.crt, server.key")
    s.add_argument("--host", default="127.0.0.1", help="address SuperNodes reach (Fleet API only), e.g. 0.0.0.0")
    s.add_argument("--port", type=int, default=9093)
    s.add_argument("--control-address", default=DEFAULT_CONTROL_ADDRESS,
                   help="loopback or private host:port of the unauthenticated Control API (flwr run, register) "
                        f"and the Runtime API (default {DEFAULT_CONTROL_ADDRESS})")
    s.add_argument("--database", default=None, help="SQLite state file (default: in memory)")

    for name, helptext in (("register", "register a site's public key"),
                           ("unregister", "unregister a SuperNode by node id"),
                           ("sites", "list registered SuperNodes (JSON)"),
                           ("status", "list runs (JSON)")):
        r = sub.add_parser(name, help=helptext)
        if name == "register":
            r.add_argument("public_key")
            r.add_argument("--name", default=None)
        elif name == "unregister":
            r.add_argument("node_id", type=int)
        r.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
        r.add_argument("--flwr-home", default=None)
    return p


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESTART_HINT = ("Start it again with the same command (pass --database to keep registered sites); a run it was "
                "serving resumes from its checkpoint with: flwr run . <connection> --run-config "
                "\"output.dir='<run dir>' output.resume=true\"")


def _run_foreground(cmd: list[str], stopped: str = "", grace: float = 8.0) -> int:
    """Run ``cmd`` until it exits. SIGINT, SIGTERM or SIGHUP to this process stop it and every
    descendant within ``grace`` + 5 seconds (SIGTERM, then SIGKILL), print ``stopped`` and return
    128 + the signal."""
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = proc.wait()
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128+N
    except KeyboardInterrupt as stop:
        for sig in previous:  # a second signal must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        terminate_tree(proc, grace)
        signum = int(stop.args[0]) if stop.args and isinstance(stop.args[0], int) else int(signal.SIGINT)
        print(f"error: stopped by {signal.Signals(signum).name}; every process it started was stopped. {stopped}".rstrip(),
              file=sys.stderr)
        return 128 + signum
    finally:
        if proc.poll() is None:
            terminate_tree(proc, 5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.ops``: operator commands; errors print ``error: …`` and return their exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "certs":
            files = make_ca_and_server_cert(args.out_dir, tuple(args.hosts or ("127.0.0.1", "localhost")), args.days)
            print(f"wrote {files.ca_cert}, {files.ca_key}, {files.server_cert}, {files.server_key}; "
                  f"give {files.ca_cert.name} (only) to every site")
        elif args.command == "site-keys":
            private, public = make_site_keypair(args.out_dir, args.name)
            print(f"wrote {private} (keep at the site) and {public} (send to the operator)")
        elif args.command == "write-connection":
            path = write_connection(args.flwr_home, args.name, args.address, args.ca)
            print(f"connection `{args.name}` -> {args.address} written to {path}")
        elif args.command == "start-superlink":
            cmd = superlink_command(args.certs, args.host, args.port, args.database,
                                    control_address=args.control_address)
            print(" ".join(cmd), file=sys.stderr, flush=True)
            return _run_foreground(cmd, RESTART_HINT)
        elif args.command == "register":
            node_id = register_site(args.flwr_home, args.connection, args.public_key, args.name)
            print(json.dumps({"node-id": node_id}))
        elif args.command == "unregister":
            unregister_site(args.flwr_home, args.connection, args.node_id)
            print(json.dumps({"unregistered": args.node_id}))
        elif args.command == "sites":
            print(json.dumps(list_sites(args.flwr_home, args.connection), indent=2))
        elif args.command == "status":
            print(json.dumps(run_status(args.flwr_home, args.connection), indent=2))
    except FedTLError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
