import os

import pytest

from flwr.common.config import parse_config_args

from clients.site import main, node_config, start_command
from fedtl.errors import ConfigError


def _site(tmp_path, with_keys=True):
    (tmp_path / "d.npz").write_bytes(b"")
    keys = ""
    if with_keys:
        for name in ("ca.crt", "site.key", "site.pub"):
            (tmp_path / name).write_text("x")
        keys = '[tls]\nca-cert = "ca.crt"\n[auth]\nprivate-key = "site.key"\npublic-key = "site.pub"\n'
    conf = tmp_path / "site.toml"
    conf.write_text(f'name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "d.npz"\n{keys}')
    return conf


def test_start_command_runs_a_tls_authenticated_supernode_for_the_site(tmp_path):
    cmd = start_command(_site(tmp_path), "127.0.0.1:9093", 9100)
    assert "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd
    assert cmd[cmd.index("--node-config") + 1] == f'site-config="{(tmp_path / "site.toml").resolve()}"'
    assert (tmp_path / "state").is_dir()


def test_a_site_without_keys_or_with_missing_files_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="auth.private-key"):
        start_command(_site(tmp_path, with_keys=False), "127.0.0.1:9093", 9100)
    conf = _site(tmp_path)
    (tmp_path / "site.key").unlink()
    assert main(["start", str(conf), "--superlink", "127.0.0.1:9093", "--print-only"]) == 2
    assert "`auth.private-key`" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["it's", 'say "hi"', "both ' and \" \\ and a space", "tab\tand\nnewline"])
def test_quotes_in_the_site_path_reach_the_supernode_intact(tmp_path, folder):
    site_dir = tmp_path / folder
    site_dir.mkdir()
    cmd = start_command(_site(site_dir), "127.0.0.1:9093", 9100)
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])  # exactly as flower-supernode reads it
    assert parsed == {"site-config": str((site_dir / "site.toml").resolve())}


def test_node_config_writes_every_value_as_an_escaped_toml_string():
    text = node_config(site_config="/a\"b", partition_id="0")
    assert text == 'site-config="/a\\u0022b" partition-id="0"'
    assert parse_config_args([text]) == {"site-config": '/a"b', "partition-id": "0"}


# What flower-supernode 1.41 logs when the SuperLink refuses a key it does not know (flwr_exit with
# ExitCode.SUPERNODE_CONNECTION_ERROR and the Fleet API's FLEET_NODE_ACTIVATION_FAILED error), and when the
# SuperLink cannot be reached at all.
UNREGISTERED = ("\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
                "[code: 2004] Failed to activate SuperNode.\n"
                "The SuperNode could not establish a connection to the SuperLink.\n\n"
                "For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>\n")
UNREACHABLE = ("\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
               "[Errno 111] Connection refused\n"
               "The SuperNode could not establish a connection to the SuperLink.\n")


def test_unregistered_key_is_named_with_the_operator_command_that_fixes_it(tmp_path):
    from clients.site import explain_exit
    from fedtl.site_config import SiteConfig

    site = SiteConfig.load(_site(tmp_path))
    why = explain_exit("INFO: Starting Flower SuperNode\n" + UNREGISTERED, site, "server.example.org:9093")
    assert "does not know this site's key: it is not registered" in why
    assert "fedtl-server register --connection <connection> site.pub --name st-mary" in why
    assert str(tmp_path / "site.pub") in why and "never the .key file" in why
    other = explain_exit(UNREACHABLE, site, "server.example.org:9093")
    assert "could not connect to the SuperLink at server.example.org:9093" in other and "not registered" not in other
    assert "Connection refused" in other
    assert explain_exit("INFO: stopped\n", site, "x:1") is None


def test_the_launcher_watches_the_supernode_and_gives_it_the_sites_own_flwr_home(tmp_path, monkeypatch, capfd):
    import sys

    import clients.site as launcher

    script = ("import os, sys; print('FLWR_HOME=' + os.environ['FLWR_HOME'], flush=True); "
              f"sys.stdout.write({UNREGISTERED!r}); sys.exit(1)")
    monkeypatch.setattr(launcher, "start_command", lambda *a: [sys.executable, "-c", script])
    monkeypatch.setattr(launcher, "ACTIVATION_RETRY_SECONDS", 0.5)
    monkeypatch.setattr(launcher, "ACTIVATION_RETRY_EVERY", 0.2)
    monkeypatch.delenv("FLWR_HOME", raising=False)
    conf = _site(tmp_path)
    assert main(["start", str(conf), "--superlink", "127.0.0.1:9093", "--no-worker"]) == ConfigError.exit_code
    out, err = capfd.readouterr()
    home = (tmp_path / "state" / "flwr").resolve()
    assert f"FLWR_HOME={home}" in out and home.is_dir()  # Flower's app files stay under the site's state dir
    # the SuperNode's own output reaches the operator, but not Flower's exit block for a refusal the launcher retries
    # and explains itself ("could not establish a connection", at every try, contradicted the launcher's line)
    assert out.count("FLWR_HOME=") >= 2 and "Exit Code: 305" not in out and "could not establish" not in out
    # refused every time: tried again while the SuperLink might still count an earlier process online, then the key
    assert err.count("Trying again for") >= 1 and 'Flower exit code 305, "Failed to activate SuperNode"' in err
    assert "error: the SuperLink at 127.0.0.1:9093 does not know this site's key" in err
    assert err.count("error:") == 1 and "still counts an earlier process of this site as online" in err
    assert "fedtl-server register --connection <connection> site.pub --name st-mary" in err


def test_a_site_restarted_while_the_superlink_still_counts_it_online_joins_once_it_is_offline(tmp_path, monkeypatch,
                                                                                              capfd):
    """Killed and started again at once, a site is refused ("Failed to activate SuperNode", exit code 305, as for an
    unregistered key) until the SuperLink marks its earlier process offline, about a minute later; the launcher
    keeps trying and joins, with no false "not registered" error."""
    import sys

    import clients.site as launcher

    tries = tmp_path / "tries"
    script = (f"import pathlib, sys; p = pathlib.Path({str(tries)!r}); n = len(p.read_text()) if p.exists() else 0; "
              f"p.write_text('x' * (n + 1)); print('attempt', n + 1, flush=True); "
              f"(sys.stdout.write({UNREGISTERED!r}), sys.exit(1)) if n < 2 else sys.exit(0)")
    monkeypatch.setattr(launcher, "start_command", lambda *a: [sys.executable, "-c", script])
    monkeypatch.setattr(launcher, "ACTIVATION_RETRY_SECONDS", 30.0)
    monkeypatch.setattr(launcher, "ACTIVATION_RETRY_EVERY", 0.1)
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--no-worker"]) == 0
    out, err = capfd.readouterr()
    assert tries.read_text() == "xxx" and "attempt 3" in out  # refused twice, then joined
    assert err.count("Trying again for") == 2 and "error:" not in err
    assert "Exit Code: 305" not in out


def test_flowers_exit_block_is_printed_when_it_is_not_an_activation_refusal(tmp_path, monkeypatch, capfd):
    """A SuperLink that cannot be reached is not retried: the launcher explains it, and Flower's own block (with its
    cause, "Connection refused") is printed too, held only until the SuperNode exited."""
    import sys

    import clients.site as launcher

    script = f"import sys; print('starting', flush=True); sys.stdout.write({UNREACHABLE!r}); sys.exit(1)"
    monkeypatch.setattr(launcher, "start_command", lambda *a: [sys.executable, "-c", script])
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--no-worker"]) == ConfigError.exit_code
    out, err = capfd.readouterr()
    assert out.index("starting") < out.index("Exit Code: 305") and "[Errno 111] Connection refused" in out
    assert "Trying again" not in err and "could not connect to the SuperLink at 127.0.0.1:9093" in err


def test_a_supernode_port_in_use_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    """An earlier SuperNode of the site that outlived its launcher still holds the port: one clear line, no
    Flower traceback, no worker or SuperNode started."""
    import socket

    import clients.site as launcher

    started = []
    monkeypatch.setattr(launcher, "_run_foreground", lambda *a, **kw: started.append("supernode") or 0)
    monkeypatch.setattr(launcher, "site_worker", lambda *a, **kw: started.append("worker"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--port", str(port)])
    assert code == ConfigError.exit_code and started == []
    err = capsys.readouterr().err
    assert err.startswith(f"error: this site's SuperNode port 127.0.0.1:{port} is already in use")
    assert f"sport = :{port}" in err and "--port" in err


def test_a_supernode_killed_under_the_launcher_is_said_not_silent(tmp_path, monkeypatch, capfd):
    import sys

    import clients.site as launcher

    script = "import os, signal; print('serving', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(launcher, "start_command", lambda *a: [sys.executable, "-c", script])
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--no-worker"]) == 128 + 9
    err = capfd.readouterr().err
    assert err.startswith("error: this site's SuperNode stopped (killed by SIGKILL): the site has left the federation")
    assert "Start it again with the same command" in err


def test_a_launcher_killed_outright_takes_its_supernode_with_it(tmp_path):
    """SIGKILL to the launcher (it can stop nothing itself): the SuperNode it started in its own process group
    must not run on as an orphan, training and spending ε with nobody watching."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    child_pid = tmp_path / "child.pid"
    child = f"import os, pathlib, time; pathlib.Path({str(child_pid)!r}).write_text(str(os.getpid())); time.sleep(120)"
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; from server.processes import _run_foreground; "
                                 f"_run_foreground([sys.executable, '-c', {child!r}])"])
    try:
        deadline = time.monotonic() + 60
        while not (child_pid.exists() and child_pid.read_text()):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        pid = int(child_pid.read_text())
        assert psutil.pid_exists(pid)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        gone, alive = psutil.wait_procs([psutil.Process(pid)], timeout=10)
        assert not alive, "the SuperNode outlived its launcher"
    finally:
        launcher.kill()
        if child_pid.exists() and child_pid.read_text() and psutil.pid_exists(int(child_pid.read_text())):
            psutil.Process(int(child_pid.read_text())).kill()

def test_the_supernode_starts_with_a_short_superexec_poll_unless_the_operator_set_one(tmp_path, monkeypatch):
    """The SuperExec that starts a ClientApp per message polls every 0.1 s, not Flower's default 1 s; an
    operator's own value is kept. Checked on the environment the SuperNode process is started with."""
    import clients.site as site_module

    seen = []
    monkeypatch.setattr(site_module, "_run_foreground",
                        lambda cmd, hint, env, **kw: seen.append(env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL")) or 0)
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--no-worker"]) == 0
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--no-worker"]) == 0
    assert seen == ["0.1", "0.5"]


# ---- the site worker: started before the SuperNode, answering, stopped with it ----------------------------------
_LIGHT_WORKER = ("import sys; from fedtl.federation.worker import SiteWorker; "
                 "w = SiteWorker(sys.argv[1], handlers={}); w.bind(); w.serve_forever()")


def test_the_launcher_starts_the_worker_first_and_stops_it_with_the_supernode(tmp_path, monkeypatch):
    import sys

    import psutil

    import clients.site as launcher
    from fedtl.federation.worker_link import ping, socket_path

    seen = []

    def supernode(cmd, hint, env, **kw):  # the worker answers before the SuperNode starts
        seen.append(ping(socket_path(tmp_path / "state")))
        return 0

    monkeypatch.setattr(launcher, "worker_command", lambda path: [sys.executable, "-c", _LIGHT_WORKER, str(path)])
    monkeypatch.setattr(launcher, "_run_foreground", supernode)
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093"]) == 0
    (status,) = seen
    assert status["site"] == "st-mary"
    assert not psutil.pid_exists(status["pid"]) or psutil.Process(status["pid"]).status() == psutil.STATUS_ZOMBIE

    seen.clear()  # --no-worker: the SuperNode alone, as before
    monkeypatch.setattr(launcher, "_run_foreground", lambda *a, **kw: seen.append("supernode") or 0)
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--no-worker"]) == 0
    assert seen == ["supernode"]


def test_a_worker_killed_while_the_site_runs_is_started_again_and_stopped_with_the_site(tmp_path, monkeypatch,
                                                                                        capsys):
    import signal
    import sys
    import time

    import psutil

    import clients.site as launcher
    from fedtl.errors import SiteWorkerError
    from fedtl.federation.worker_link import ping, socket_path

    pids = []

    def supernode(cmd, hint, env, **kw):  # the SuperNode runs while the worker is killed under it
        sock = socket_path(tmp_path / "state")
        pids.append(ping(sock)["pid"])
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                pid = ping(sock, timeout=1.0)["pid"]
                if pid != pids[0]:
                    pids.append(pid)
                    return 0
            except SiteWorkerError:
                pass
            time.sleep(0.2)
        return 1

    monkeypatch.setattr(launcher, "worker_command", lambda path: [sys.executable, "-c", _LIGHT_WORKER, str(path)])
    monkeypatch.setattr(launcher, "_run_foreground", supernode)
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093"]) == 0
    assert len(pids) == 2 and pids[0] != pids[1]
    assert "the site worker exited with status -9; restarting it in 1 s" in capsys.readouterr().err
    for pid in pids:  # the successor stops with the site as the first would have
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_worker_that_keeps_dying_is_restarted_with_back_off_then_left_stopped():
    from clients.site import RestartBudget

    budget = RestartBudget(limit=3, window=100.0, cap=3.0)
    assert [budget.next_delay(t) for t in (0.0, 1.0, 2.0)] == [1.0, 2.0, 3.0]  # doubling, capped
    assert budget.next_delay(3.0) is None  # 3 restarts within 100 s: left stopped
    assert budget.next_delay(101.5) == 2.0  # the oldest restart left the window: one more is allowed


def test_a_worker_that_fails_to_start_is_a_clear_error_and_no_supernode_starts(tmp_path, monkeypatch, capsys):
    import sys

    import clients.site as launcher
    from fedtl.errors import SiteWorkerError

    started = []
    monkeypatch.setattr(launcher, "_run_foreground", lambda *a, **kw: started.append(1) or 0)
    monkeypatch.setattr(launcher, "worker_command",
                        lambda path: [sys.executable, "-c", "import sys; print('cannot import torch'); sys.exit(3)"])
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093"]) == SiteWorkerError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: the site worker exited with status 3 before answering: cannot import torch")
    assert "--no-worker" in err and started == []
    monkeypatch.setattr(launcher, "worker_command", lambda path: [sys.executable, "-c", "import time; time.sleep(30)"])
    assert main(["start", str(_site(tmp_path)), "--superlink", "127.0.0.1:9093", "--worker-timeout", "1"]) == 6
    assert "did not answer on" in capsys.readouterr().err and started == []
