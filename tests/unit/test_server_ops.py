"""server/ops.py without starting a process: certificates, keys, the connection file, command lines."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
import signal
import subprocess
import sys
import time
import tomllib

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtl.errors import ConfigError, FederationError
from server import flwr_cli, ops


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o000], ids=["umask022", "umask077", "umask000"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


# ---- certificates -------------------------------------------------------------------------------


def test_server_certificate_names_every_host_and_is_signed_by_the_ca(tmp_path, umask):
    hosts = ("127.0.0.1", "server.example.org", "::1", "localhost")
    files = ops.make_ca_and_server_cert(tmp_path / "certs", hosts, days=30)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "127.0.0.1"

    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.timezone.utc) <= cert.not_valid_after_utc

    server_key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert server_key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert ca_key.public_key().public_numbers() == ca.public_key().public_numbers()
    assert isinstance(server_key.curve, ec.SECP256R1)

    # Private keys are 0600 and certificates 0644 whatever the umask.
    assert (_mode(files.ca_key), _mode(files.server_key)) == (0o600, 0o600)
    assert (_mode(files.ca_cert), _mode(files.server_cert)) == (0o644, 0o644)


def test_certificates_never_overwrite_and_bad_arguments_write_nothing(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="Refusing to overwrite existing file.*server.key"):
        ops.make_ca_and_server_cert(out)
    assert sorted(p.name for p in out.iterdir()) == ["server.key"] and (out / "server.key").read_bytes() == b"mine"
    for hosts, days, message in [(("127.0.0.1",), 0, "must be >= 1, got 0"), ((), 365, "At least one host"),
                                 (("127.0.0.1", " "), 365, "Empty host name")]:
        with pytest.raises(ConfigError, match=message):
            ops.make_ca_and_server_cert(tmp_path / "other", hosts, days)
        assert not (tmp_path / "other").exists()


def test_site_keypair_is_openssh_p384_with_a_private_0600_key(tmp_path, umask):
    private, public = ops.make_site_keypair(tmp_path / "keys", "st-mary")
    assert (private.name, public.name) == ("st-mary.key", "st-mary.pub")
    assert (_mode(private), _mode(public)) == (0o600, 0o644)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    line = public.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.endswith(" st-mary\n") and line.count("\n") == 1
    pub = serialization.load_ssh_public_key(line.rsplit(" ", 1)[0].encode())
    assert pub.public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize("name", ["", "-x", "../evil", "a/b", "a b", "x" * 65, ".hidden"])
def test_site_keypair_refuses_bad_names(tmp_path, name):
    with pytest.raises(ConfigError, match="Invalid site name"):
        ops.make_site_keypair(tmp_path / "keys", name)
    assert not (tmp_path / "keys").exists()


def test_site_keypair_keeps_an_existing_key(tmp_path):
    ops.make_site_keypair(tmp_path, "a")
    before = (tmp_path / "a.key").read_bytes()
    with pytest.raises(ConfigError, match="Refusing to overwrite"):
        ops.make_site_keypair(tmp_path, "a")
    assert (tmp_path / "a.key").read_bytes() == before


# ---- the flwr connection file ------------------------------------------------------------------


@pytest.fixture
def ca_file(tmp_path):
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def test_connection_goes_into_flwr_home_and_flower_reads_it(tmp_path, ca_file, monkeypatch):
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = ops.write_connection(None, "fedtl-tls", "server.example.org:9093", "ca.crt")  # relative CA path
    assert path == home / "config.toml"
    data = tomllib.loads(path.read_text())
    assert data["superlink"] == {"default": "fedtl-tls",
                                 "fedtl-tls": {"address": "server.example.org:9093", "root-certificates": str(ca_file)}}
    assert os.path.isabs(data["superlink"]["fedtl-tls"]["root-certificates"])

    from flwr.cli.flower_config import read_superlink_connection

    conn = read_superlink_connection(None)
    assert (conn.name, conn.address, conn.root_certificates) == ("fedtl-tls", "server.example.org:9093", str(ca_file))
    assert not conn.insecure


def test_connection_keeps_other_connections_and_their_default(tmp_path, ca_file):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:9093"\n'
                                      'insecure = true\n')
    ops.write_connection(home, "prod", "[::1]:9093", ca_file, make_default=False)
    data = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert data["default"] == "local" and data["local"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert data["prod"] == {"address": "[::1]:9093", "root-certificates": str(ca_file)}
    ops.write_connection(home, "prod", "10.0.0.2:9093", ca_file)  # replaced, and now the default
    data = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert data["default"] == "prod" and data["prod"]["address"] == "10.0.0.2:9093" and "local" in data
    assert list(data)[0] == "default"


@pytest.mark.parametrize("name,address,ca,message", [
    ("fedtl", "server.example.org", "ca", "must be host:port"),
    ("fedtl", "host:9093; rm -rf /", "ca", "must be host:port"),
    ("fed tl", "host:9093", "ca", "Invalid connection name"),
    ("fedtl", "host:9093", "missing", "CA certificate `.*missing.crt` does not exist"),
])
def test_bad_connections_are_refused_and_the_file_is_untouched(tmp_path, ca_file, name, address, ca, message):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("# mine\n")
    with pytest.raises(ConfigError, match=message):
        ops.write_connection(home, name, address, ca_file if ca == "ca" else tmp_path / "missing.crt")
    assert (home / "config.toml").read_text() == "# mine\n"


def test_an_unreadable_config_toml_is_not_replaced(tmp_path, ca_file):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[superlink\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        ops.write_connection(home, "fedtl", "h:1", ca_file)
    assert (home / "config.toml").read_text() == "[superlink\n"


# ---- command lines -----------------------------------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """Flower's executables next to a fake interpreter, so command lines name them predictably."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    for name in ("python", "flower-superlink", "flower-supernode", "flwr"):
        (bindir / name).write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    return bindir


def test_superlink_command_is_tls_with_supernode_auth(tmp_path, fake_bin):
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        (certs / name).write_text("x")
    cmd = ops.superlink_command(certs, "0.0.0.0", 9093, state_db=tmp_path / "state.db")
    # Flower's SuperLink app split in two: the Fleet API alone on the public address, the Control and
    # Runtime APIs on loopback (Flower 1.41 would serve all three, unauthenticated, on one port)
    assert cmd[:7] == [sys.executable, "-m", "server.superlink", "--fleet-address", "0.0.0.0:9093",
                       "--control-address", "127.0.0.1:9091"]
    assert cmd[7:] == ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
                       "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
                       "--disable-runtime-dependency-installation", "--isolation", "subprocess",
                       "--database", str(tmp_path / "state.db")]
    assert "--host" not in cmd and "--port" not in cmd and "--insecure" not in cmd
    assert "--database" not in ops.superlink_command(certs, "127.0.0.1", 1)
    (certs / "server.key").unlink()
    with pytest.raises(ConfigError, match="Server private key `.*server.key` does not exist"):
        ops.superlink_command(certs, "0.0.0.0", 9093)


@pytest.mark.parametrize("port", [0, 65536, -1, True, "9093", 9093.0])
def test_ports_outside_1_65535_or_not_integers_are_refused(tmp_path, fake_bin, port):
    (tmp_path / "k").write_text("x")
    with pytest.raises(ConfigError, match="must be an integer in 1..65535"):
        ops.supernode_command("h:1", None, tmp_path / "k", port, "")


def test_supernode_command_uses_the_site_key_and_ca(tmp_path, fake_bin):
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "st.key").write_text("x")
    cmd = ops.supernode_command("server.example.org:9093", tmp_path / "ca.crt", tmp_path / "st.key", 9094,
                                "site-config='/srv/site.toml'", max_retries=3, max_wait_time=2)
    assert cmd == [str(fake_bin / "flower-supernode"), "--superlink", "server.example.org:9093",
                   "--root-certificates", str(tmp_path / "ca.crt"),
                   "--auth-supernode-private-key", str(tmp_path / "st.key"), "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", "9094", "--node-config", "site-config='/srv/site.toml'",
                   "--max-retries", "3", "--max-wait-time", "2.0"]
    assert "--root-certificates" not in ops.supernode_command("h:1", None, tmp_path / "st.key", 9094, "")
    with pytest.raises(ConfigError, match="must be host:port"):
        ops.supernode_command("server.example.org", None, tmp_path / "st.key", 9094, "")


def test_executables_come_from_the_interpreters_folder_else_path_else_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="`flwr` not found next to .* nor on PATH"):
        ops._executable("flwr")
    (tmp_path / "elsewhere").mkdir()
    on_path = tmp_path / "elsewhere" / "flwr"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert ops._executable("flwr") == str(on_path)
    (tmp_path / "flwr").write_text("")
    assert ops._executable("flwr") == str(tmp_path / "flwr")


# ---- flwr CLI wrappers -------------------------------------------------------------------------


class FakeFlwr:
    """Stands in for subprocess.run: records each call, answers with a scripted reply."""

    def __init__(self, stdout: str = "{}", returncode: int = 0, stderr: str = "", raises: Exception | None = None):
        self.stdout, self.returncode, self.stderr, self.raises = stdout, returncode, stderr, raises
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append((list(cmd), kwargs))
        if self.raises is not None:
            raise self.raises
        return subprocess.CompletedProcess(cmd, self.returncode, self.stdout, self.stderr)


@pytest.fixture
def flwr(monkeypatch, fake_bin):
    def install(**kwargs) -> FakeFlwr:
        fake = FakeFlwr(**kwargs)
        monkeypatch.setattr(flwr_cli.subprocess, "run", fake)  # where the flwr wrappers live since the split
        return fake
    return install


def test_register_builds_the_flwr_call_and_returns_the_node_id(tmp_path, flwr, fake_bin):
    key = tmp_path / "st-mary.pub"
    key.write_text("ecdsa-sha2-nistp384 AAAA st-mary\n")
    fake = flwr(stdout='Loading...\n{"success": true, "node-id": 42}\n')
    assert ops.register_site(tmp_path / "home", "fedtl-tls", key, name="st-mary") == 42
    (cmd, kwargs), = fake.calls
    assert cmd == [str(fake_bin / "flwr"), "supernode", "register", str(key), "fedtl-tls", "--name", "st-mary",
                   "--format", "json"]
    assert kwargs["env"]["FLWR_HOME"] == str(tmp_path / "home") and kwargs["env"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert kwargs["timeout"] > 0 and kwargs["check"] is False


def test_unregister_list_and_status_calls(tmp_path, flwr, fake_bin, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "envhome"))
    fake = flwr(stdout=json.dumps({"success": True, "nodes": [{"node-id": 1, "status": "online"}],
                                   "runs": [{"run-id": 7, "status": "finished"}]}))
    ops.unregister_site(None, "c", 5)
    assert ops.list_sites(None, "c") == [{"node-id": 1, "status": "online"}]
    assert ops.run_status(None, "c") == [{"run-id": 7, "status": "finished"}]
    flwr_path = str(fake_bin / "flwr")
    assert [c for c, _ in fake.calls] == [[flwr_path, "supernode", "unregister", "5", "c", "--format", "json"],
                                          [flwr_path, "supernode", "list", "c", "--format", "json"],
                                          [flwr_path, "ls", "c", "--format", "json"]]
    assert all(kw["env"]["FLWR_HOME"] == str(tmp_path / "envhome") for _, kw in fake.calls)


@pytest.mark.parametrize("reply,message", [
    ({"stdout": '{"success": false, "error-message": "Public key already registered"}'}, "already registered"),
    ({"stdout": "", "returncode": 1, "stderr": "connection refused"}, "exit status 1.*connection refused"),
    ({"stdout": "not json at all"}, "exit status 0.*not json at all"),
    ({"raises": subprocess.TimeoutExpired("flwr", 60)}, "did not answer within 60 s"),
])
def test_flwr_failures_become_federation_errors(tmp_path, flwr, reply, message):
    key = tmp_path / "k.pub"
    key.write_text("x")
    flwr(**reply)
    with pytest.raises(FederationError, match=message):
        ops.register_site(tmp_path, "c", key)


def test_register_refuses_a_missing_key_or_bad_name_before_calling_flwr(tmp_path, flwr):
    fake = flwr(stdout='{"node-id": 1}')
    with pytest.raises(ConfigError, match="Public key .* does not exist"):
        ops.register_site(tmp_path, "c", tmp_path / "nope.pub")
    (tmp_path / "k.pub").write_text("x")
    with pytest.raises(ConfigError, match="Invalid site name"):
        ops.register_site(tmp_path, "c", tmp_path / "k.pub", name="a b")
    assert fake.calls == []


def test_sites_lists_each_registered_node_with_its_site_name(tmp_path, flwr, capsys):
    """Flower lists node ids only; the name recorded at registration (by key fingerprint) is shown beside each."""
    home = tmp_path / "home"
    _, mary = ops.make_site_keypair(tmp_path / "keys", "st-mary")
    _, john = ops.make_site_keypair(tmp_path / "keys", "st-john")
    # the fingerprint an operator compares with `ssh-keygen -lf st-mary.pub` (before subprocess.run is faked)
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(mary)], capture_output=True, text=True).stdout.split()
    flwr(stdout='{"success": true, "node-id": 42}')
    assert ops.register_site(home, "c", mary) == 42  # no --name: the key's comment (site-keys writes the name)
    flwr(stdout='{"success": true, "node-id": 7}')
    ops.register_site(home, "c", john, name="john-hospital")
    flwr(stdout='{"success": true, "nodes": [{"node-id": "42", "status": "online"}, {"node-id": "7", "status": "offline"},'
                ' {"node-id": "9", "status": "online"}]}')
    assert ops.main(["sites", "--connection", "c", "--flwr-home", str(home)]) == 0
    nodes = json.loads(capsys.readouterr().out)
    assert [(n["node-id"], n.get("site-name")) for n in nodes] == [("42", "st-mary"), ("7", "john-hospital"), ("9", None)]
    if fingerprint:
        assert nodes[0]["key-fingerprint"] == fingerprint[1]
    assert ops.list_sites(home, "other-connection") == [{"node-id": "42", "status": "online"},
                                                        {"node-id": "7", "status": "offline"},
                                                        {"node-id": "9", "status": "online"}]  # per SuperLink
    flwr(stdout='{"success": true}')
    ops.unregister_site(home, "c", 42)
    recorded = json.loads((home / "fedtl-sites.json").read_text())["connections"]["c"]
    assert [e["name"] for e in recorded.values()] == ["john-hospital"]


# ---- the command line --------------------------------------------------------------------------


def test_cli_certs_site_keys_and_write_connection(tmp_path, capsys):
    assert ops.main(["certs", str(tmp_path / "certs"), "--host", "10.1.2.3", "--host", "srv", "--days", "2"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == ["srv"]
    assert ops.main(["site-keys", str(tmp_path / "keys"), "st-mary"]) == 0
    assert ops.main(["write-connection", "c1", "srv:9093", "--ca", str(tmp_path / "certs" / "ca.crt"),
                     "--flwr-home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    assert "give ca.crt (only) to every site" in out and "st-mary.pub (send to the operator)" in out
    assert "connection `c1` -> srv:9093" in out
    assert (tmp_path / "keys" / "st-mary.key").exists() and (tmp_path / "home" / "config.toml").exists()


def test_cli_certs_default_hosts(tmp_path):
    assert ops.main(["certs", str(tmp_path)]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_cli_start_superlink_runs_the_built_command(tmp_path, fake_bin, monkeypatch, capsys):
    ops.make_ca_and_server_cert(tmp_path / "certs")
    ran = []
    monkeypatch.setattr(ops, "_run_foreground", lambda cmd, *a: ran.append(cmd) or 7)
    assert ops.main(["start-superlink", "--certs", str(tmp_path / "certs"), "--port", "9999"]) == 7
    assert ran == [ops.superlink_command(tmp_path / "certs", "127.0.0.1", 9999)]
    assert capsys.readouterr().err.strip() == " ".join(ran[0])


def test_cli_register_unregister_sites_status_print_json(tmp_path, flwr, capsys):
    (tmp_path / "k.pub").write_text("x")
    flwr(stdout='{"node-id": 3, "nodes": [{"node-id": 3}], "runs": []}')
    assert ops.main(["register", str(tmp_path / "k.pub"), "--connection", "c"]) == 0
    assert json.loads(capsys.readouterr().out) == {"node-id": 3}
    assert ops.main(["unregister", "3", "--connection", "c"]) == 0
    assert json.loads(capsys.readouterr().out) == {"unregistered": 3}
    assert ops.main(["sites", "--connection", "c"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"node-id": 3}]
    assert ops.main(["status", "--connection", "c"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_errors_exit_with_their_code_and_debug_shows_the_traceback(tmp_path, flwr, capsys):
    assert ops.main(["certs", str(tmp_path), "--days", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: Certificate validity `days` must be >= 1, got 0."]
    (tmp_path / "k.pub").write_text("x")
    flwr(stdout="", returncode=1, stderr="unreachable")
    assert ops.main(["register", str(tmp_path / "k.pub"), "--connection", "c"]) == 6
    assert capsys.readouterr().err.startswith("error: Registering `k.pub` at `c` failed")
    with pytest.raises(ConfigError):
        ops.main(["--debug", "certs", str(tmp_path), "--days", "0"])
    assert not (tmp_path / "ca.crt").exists()


# ---- processes (tiny shell commands only, never Flower's) --------------------------------------


def test_foreground_exit_status_and_a_signal_as_the_shells_128_plus_n():
    assert ops._run_foreground(["sh", "-c", "exit 3"]) == 3
    assert ops._run_foreground(["sh", "-c", "kill -TERM $$"]) == 128 + 15


def test_wait_for_port_sees_a_listener_and_gives_up_on_a_closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert ops.wait_for_port("127.0.0.1", port, 1.0)
    assert not ops.wait_for_port("127.0.0.1", port, 0.1)


def test_managed_process_is_stopped_on_leaving_the_block(tmp_path):
    with ops.ManagedProcess(["sh", "-c", "echo started; exec sleep 30"], tmp_path / "p.log", stop_timeout=2) as p:
        assert p.returncode is None
        deadline = time.monotonic() + 10  # no port to wait for: start() returns before sh has run (a loaded CI)
        while "started" not in p.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert p.returncode == -15  # SIGTERM
    assert "started" in p.log_text()


def test_managed_process_that_exits_before_its_port_opens_is_a_federation_error(tmp_path):
    proc = ops.ManagedProcess(["sh", "-c", "echo boom; exit 4"], tmp_path / "p.log", port=1, start_timeout=5)
    with pytest.raises(FederationError, match="`sh` exited with status 4 before 127.0.0.1:1 opened; .*boom"):
        proc.start()
    assert proc.returncode == 4
    with pytest.raises(FederationError, match="Could not start `/nonexistent/cmd`"):
        ops.ManagedProcess(["/nonexistent/cmd"], tmp_path / "q.log").start()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_a_launcher_stops_its_whole_tree_within_15_s(tmp_path, sig):
    import psutil

    ROOT = Path(__file__).resolve().parents[2]
    script = ("import sys; from server.ops import _run_foreground; "
              "sys.exit(_run_foreground(['sh', '-c', 'trap \"\" TERM; sleep 300 & sleep 300 & wait'], 'hint', grace=1.5))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    family: list = []
    while time.monotonic() < deadline and len([p for p in family if p.name() == "sleep"]) < 2:
        family = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.1)
    assert len([p for p in family if p.name() == "sleep"]) == 2
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 128 + sig
    # a stop is how a service ends, said plainly (it was "error: stopped by …"); the exit code says the signal
    assert err.strip() == f"stopped by {sig.name}; every process it started was stopped. hint"
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_the_superlinks_restart_hint_suggests_a_database_only_when_none_was_passed(tmp_path):
    kept = ops.restart_hint(str(tmp_path / "superlink.db"))
    assert "registered sites are kept in" in kept and "pass --database" not in kept and "output.resume=true" in kept
    assert "pass --database to keep registered sites" in ops.restart_hint(None)


def test_a_deployed_serverapp_shows_fedtl_round_lines_once_and_leaves_configured_logging_alone():
    """A deployed ServerApp process configures no logging, so fedtl's INFO lines (each round, the summary) never
    reached `flwr run --stream`; where logging is configured (`fedtl simulate`) nothing is added (no duplicates)."""
    import subprocess
    import sys

    emit = ("import logging; from fedtl.federation.logs import show_progress; {setup}show_progress(); show_progress(); "
            "logging.getLogger('fedtl.federation.tracking').info('Round 1/2 | val AUC 0.9')")
    bare = subprocess.run([sys.executable, "-c", emit.format(setup="")], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0 and bare.stderr.count("Round 1/2 | val AUC 0.9") == 1, bare.stderr
    configured = subprocess.run([sys.executable, "-c", emit.format(setup="logging.basicConfig(level=logging.INFO); ")],
                                capture_output=True, text=True, timeout=120)
    assert configured.returncode == 0 and configured.stderr.count("Round 1/2 | val AUC 0.9") == 1, configured.stderr
