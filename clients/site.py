"""What a data site runs: validate its site.toml, then start its SuperNode (TLS + node auth).

    fedtl-site start site.toml --superlink server.example.org:9093 [--port 9094]
    (the same as: python -m clients.site start …)

The SuperNode gets ``--node-config 'site-config="<site.toml>"'``, so the ClientApp trains on this
site's own data with this site's own privacy budget and ledger (``<state-dir>``). Checking the
data without connecting: ``fedtl site check site.toml``.

The SuperNode runs with ``FLWR_HOME=<state-dir>/flwr``: the Flower app files it receives (and Flower's other
files) live under the site's own state, not in a ``~/.flwr`` shared by every site on the host. Its output is
copied to the launcher's and watched: when Flower refuses the site's key ("Exit Code: 305 … Failed to
activate SuperNode"; Flower's exit block is then left out, the launcher says it in its own words) the launcher tries
again for 90 s — the SuperLink refuses a node it still counts online, about a
minute after a site was killed, with the same code — then says that the key may not be registered and which operator
command fixes it. A SuperNode port already in use is refused before anything starts; a SuperNode that stops by itself
(killed, crashed) is said in one ``error:`` line, with the exit status; a launcher killed outright takes its
SuperNode and worker with it (the kernel's parent-death signal), so no orphan goes on training.

The site worker: before the SuperNode, the launcher starts the site's long-lived worker
(``python -m fedtl.federation.worker site.toml``: torch, Opacus and the site's data loaded once) and waits until
it answers on ``<state-dir>/worker/worker.sock``; the ClientApp that Flower starts for each message forwards it
there instead of importing and loading everything again (falling back to doing so itself when the worker is gone).
A worker that dies while the site runs is started again after a back-off (at most 5 times in 10 minutes; the
ClientApps serve messages in-process meanwhile). The worker stops with the site. ``--no-worker`` starts the SuperNode alone: every message is served in its own
ClientApp process, as before.

Flower reads ``--node-config`` with a regular expression (``key='…'``, ``key="…"`` or a bare word) and
then as TOML, so a path holding ``'`` or ``"`` cannot simply be quoted: :func:`node_config` writes each
value as a TOML basic string in which ``"``, ``\\`` and control characters are ``\\uXXXX`` escapes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from fedtl.errors import ConfigError, FedTLError, SiteWorkerError
from fedtl.site_config import SiteConfig
from server.flwr_cli import supernode_command
from server.processes import STOP_SIGNALS, _copy_lines, _run_foreground, terminate_tree

WORKER_START_TIMEOUT = 180.0  # seconds for the worker's imports and data on a busy machine

# A SuperLink marks a node offline 2 heartbeats (Flower's default interval: 30 s) after its last one, and until then
# refuses to activate it again, with the same "Failed to activate SuperNode" (exit code 305) as for a key it was
# never given. A site restarted within a minute of being killed therefore gets that refusal; the launcher tries
# again for this long before it says that the key may not be registered.
ACTIVATION_RETRY_SECONDS = 90.0
ACTIVATION_RETRY_EVERY = 10.0

# Flower 1.41 starts one ClientApp process per message through the SuperNode's SuperExec, which polls for new
# tasks every second by default (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 0.01-60 s). Polled every 0.1 s, a
# message waits 0.05 s on average instead of 0.5 s, for ten local requests a second (docs/deployment-timing.md).
# A value the site's operator sets in the environment is kept.
SUPERNODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def start_command(site_config: str | Path, superlink: str, port: int) -> list[str]:
    """The SuperNode command for a validated site; refuses a site whose key or CA files are missing."""
    path = Path(site_config).resolve()
    site = SiteConfig.load(path)
    missing = site.missing_files()
    if missing:
        raise ConfigError("Site file names missing files: " + ", ".join(f"`{k}` = {p}" for k, p in missing))
    if site.auth.private_key is None or site.tls.ca_cert is None:
        raise ConfigError(f"`auth.private-key` and `tls.ca-cert` must be set to join a deployment (in {path}).")
    Path(site.state_dir).mkdir(parents=True, exist_ok=True)
    return supernode_command(superlink, site.tls.ca_cert, site.auth.private_key, port, node_config(site_config=path))


def site_env(site: SiteConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The SuperNode's environment: ``FLWR_HOME`` under the site's state dir (created), Flower's telemetry off,
    the SuperExec's short task poll (:data:`SUPERNODE_ENV`)."""
    home = Path(site.state_dir).resolve() / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    for key, value in SUPERNODE_ENV.items():  # inherited by the SuperExec the SuperNode starts; an operator's kept
        env.setdefault(key, value)
    return env


def worker_command(site_config: str | Path) -> list[str]:
    """The site worker's command (it stops by itself when the launcher that started it is gone)."""
    return [sys.executable, "-m", "fedtl.federation.worker", str(Path(site_config).resolve()), "--exit-with-parent"]


class RestartBudget:
    """When a worker that died may be started again: at most ``limit`` restarts in any ``window`` seconds, each
    after a back-off that doubles (1, 2, 4 … ``cap`` s). A worker that keeps dying is left dead: the ClientApps
    serve every message in-process (slower, same result) until the site is started again."""

    def __init__(self, limit: int = 5, window: float = 600.0, cap: float = 30.0) -> None:
        self.limit, self.window, self.cap = limit, window, cap
        self.times: list[float] = []

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next restart, or None when the budget is spent."""
        self.times = [t for t in self.times if now - t < self.window]
        if len(self.times) >= self.limit:
            return None
        delay = min(self.cap, 2.0 ** len(self.times))
        self.times.append(now)
        return delay


class WorkerHandle:
    """The launcher's site worker: the process that serves now (a restarted one replaces a dead one)."""

    def __init__(self, site_config: str | Path, env: Mapping[str, str] | None, budget: RestartBudget) -> None:
        self.site_config, self.env, self.budget = site_config, env, budget
        self.proc: subprocess.Popen[str] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def spawn(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(worker_command(self.site_config), env=dict(self.env) if self.env is not None else None,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1)
        threading.Thread(target=_copy_lines, args=(proc.stdout, self.tail.append), daemon=True).start()
        self.proc = proc
        return proc

    def watch(self) -> None:
        """Restart the worker when it exits while the site runs (thread body)."""
        while not self._stopping.is_set():
            proc = self.proc
            code = proc.wait()
            if self._stopping.is_set():
                return
            delay = self.budget.next_delay(time.monotonic())
            if delay is None:
                print(f"fedtl-site: the site worker exited with status {code} again ({self.budget.limit} restarts "
                      f"within {self.budget.window:.0f} s); it is not restarted. ClientApps serve every message "
                      "in-process (slower, same result) until the site is started again. Its last output: "
                      f"{' '.join(''.join(self.tail).split())[-600:]}", file=sys.stderr, flush=True)
                return
            print(f"fedtl-site: the site worker exited with status {code}; restarting it in {delay:.0f} s "
                  "(ClientApps serve messages in-process meanwhile).", file=sys.stderr, flush=True)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.spawn()
                self.restarts += 1

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None:
            terminate_tree(proc, 5.0)


@contextlib.contextmanager
def site_worker(site_config: str | Path, env: Mapping[str, str] | None = None,
                timeout: float = WORKER_START_TIMEOUT, budget: RestartBudget | None = None) -> Iterator[WorkerHandle]:
    """The site's worker, started and answering a ping before the block runs, restarted if it dies while the
    block runs (within ``budget``), stopped (with its children) after it. Its output is copied to this process's
    stdout. SiteWorkerError if the first one exits or does not answer in time."""
    from fedtl.federation.worker_link import ping, socket_path

    site = SiteConfig.load(site_config)
    path = socket_path(site.state_dir)
    handle = WorkerHandle(site_config, env, budget or RestartBudget())
    proc = handle.spawn()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SiteWorkerError(f"the site worker exited with status {proc.returncode} before answering: "
                                      f"{' '.join(''.join(handle.tail).split())[-600:]} (start with --no-worker to "
                                      "run without it)")
            try:
                status = ping(path, timeout=2.0)
                if status.get("pid") == proc.pid:
                    break
            except SiteWorkerError:
                pass
            if time.monotonic() > deadline:
                raise SiteWorkerError(f"the site worker did not answer on {path} within {timeout:.0f} s (start "
                                      "with --no-worker to run without it)")
            time.sleep(0.2)
        threading.Thread(target=handle.watch, name="site-worker-watch", daemon=True).start()
        yield handle
    finally:
        handle.stop()


def explain_exit(output: str, site: SiteConfig, superlink: str) -> str | None:
    """A message a site operator can act on for a SuperNode that failed to join, from its output; None if unknown."""
    if "Exit Code: 305" not in output:
        return None
    if "Failed to activate SuperNode" in output:
        pub = site.auth.public_key
        key = pub.name if pub is not None else f"{site.name}.pub"
        return (f"the SuperLink at {superlink} does not know this site's key: it is not registered (Flower: \"Failed "
                f"to activate SuperNode\", exit code 305). Send the public key {pub or key} (never the .key file) to "
                f"the server operator, who registers it with\n"
                f"    fedtl-server register --connection <connection> {key} --name {site.name}\n"
                "(or `python -m server.ops register …`), then start this site again with the same command. (The same "
                "refusal comes while the SuperLink still counts an earlier process of this site as online, for about "
                "a minute after it was killed: `fedtl-server sites` shows the site `online` then.)")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    opened = [i for i, line in enumerate(lines) if line.startswith("Failed to initialize the connection")]
    detail = lines[opened[-1] + 1] if opened and opened[-1] + 1 < len(lines) else (lines[-1] if lines else "")
    return (f"could not connect to the SuperLink at {superlink} (Flower exit code 305: {detail}). Check the address "
            "and port, that the SuperLink is running, and that `tls.ca-cert` is the operator's ca.crt.")


def activation_refused(output: str) -> bool:
    """The SuperLink refused to activate this node: an unregistered key, or the node still counted online."""
    return "Exit Code: 305" in output and "Failed to activate SuperNode" in output


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """ConfigError when something already listens on ``host:port`` (the SuperNode's own API port): most often an
    earlier SuperNode of this site that outlived its launcher, or another site's on the same host."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free to bind
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"this site's SuperNode port {host}:{port} is already in use ({exc.strerror}): an earlier "
                              f"SuperNode of this site may still be running (`ss -ltnp 'sport = :{port}'` names the "
                              "process; stop it), or another site on this host uses it (give each its own --port).") \
                from None


def node_config(**values: str | Path) -> str:
    """``--node-config`` text for string values (``site_config`` → ``site-config``), any characters allowed."""
    def quoted(text: str) -> str:
        return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c
                             for c in text) + '"'

    return " ".join(f"{key.replace('_', '-')}={quoted(str(value))}" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtl-site", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start this site's SuperNode in the foreground")
    p.add_argument("site_config")
    p.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    p.add_argument("--port", type=int, default=9094, help="this SuperNode's own ClientAppIo port")
    p.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    p.add_argument("--no-worker", action="store_true",
                   help="no long-lived site worker: each message is served in its own ClientApp process (slower)")
    p.add_argument("--worker-timeout", type=float, default=WORKER_START_TIMEOUT,
                   help="seconds the site worker may take to start (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        cmd = start_command(args.site_config, args.superlink, args.port)
    except FedTLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.print_only:
        print(" ".join(cmd))
        return 0
    site = SiteConfig.load(args.site_config)
    env = site_env(site)
    stopped = threading.Event()
    try:
        check_port_free(args.port)
        with contextlib.ExitStack() as stack:
            if not args.no_worker:
                stack.enter_context(site_worker(args.site_config, env, args.worker_timeout))
            code = _supernode_until_activated(cmd, env, stopped)
    except FedTLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if code == 0 or stopped.is_set():
        return code
    if why := explain_exit("".join(_SUPERNODE_TAIL), site, args.superlink):
        print(f"error: {why}", file=sys.stderr)
        return ConfigError.exit_code
    how = f"killed by {signal.Signals(code - 128).name}" if 128 < code < 160 and code - 128 in _SIGNALS else \
        f"exit status {code}"
    print(f"error: this site's SuperNode stopped ({how}): the site has left the federation. Start it again with the "
          "same command: it rejoins the run and never spends privacy twice on a round it already trained.",
          file=sys.stderr)
    return code


_SIGNALS = {int(s) for s in signal.Signals}


def _supernode_until_activated(cmd: list[str], env: dict[str, str], stopped: threading.Event) -> int:
    """The SuperNode; started again every :data:`ACTIVATION_RETRY_EVERY` s for :data:`ACTIVATION_RETRY_SECONDS` while
    the SuperLink refuses to activate it (see there), saying why once."""
    deadline = time.monotonic() + ACTIVATION_RETRY_SECONDS
    while True:
        code = _run_supernode(cmd, env, stopped)
        if code == 0 or stopped.is_set() or not activation_refused("".join(_SUPERNODE_TAIL)):
            return code
        left = deadline - time.monotonic()
        if left <= 0:
            return code
        print(f"fedtl-site: the SuperLink refused to activate this site (Flower exit code 305, \"Failed to activate "
              "SuperNode\"): its key is not "
              "registered, or the SuperLink still counts an earlier process of this site as online (it marks a "
              f"stopped site offline about a minute after its last heartbeat). Trying again for {left:.0f} s.",
              file=sys.stderr, flush=True)
        if signum := _sleep_unless_stopped(min(ACTIVATION_RETRY_EVERY, left), stopped):
            return 128 + signum


def _sleep_unless_stopped(seconds: float, stopped: threading.Event) -> int:
    """Wait ``seconds``; the signal's number (``stopped`` set, said) if SIGINT / SIGTERM / SIGHUP came meanwhile,
    else 0."""
    came: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        came.append(signum)
        stopped.set()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        stopped.wait(seconds)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if not came:
        return 0
    print(f"stopped by {signal.Signals(came[0]).name} while waiting to join.", file=sys.stderr)
    return came[0]


_SUPERNODE_TAIL: collections.deque[str] = collections.deque(maxlen=400)  # its last lines, for explain_exit


class _SupernodeOutput:
    """The SuperNode's output, printed as it comes, except Flower's exit block (from its "Exit Code: 305" line on),
    which is held until the SuperNode has exited: when it is the activation refusal the launcher retries or explains
    in its own words, it is dropped (Flower's "could not establish a connection to the SuperLink", printed at every
    try, read as a contradiction of the launcher's line beside it); any other exit block is printed then."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def __call__(self, line: str) -> None:
        _SUPERNODE_TAIL.append(line)
        if self.held or "Exit Code: 305" in line:
            self.held.append(line)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    def finish(self) -> None:
        if not activation_refused("".join(_SUPERNODE_TAIL)):
            sys.stdout.write("".join(self.held))
            sys.stdout.flush()
        self.held.clear()


def _run_supernode(cmd: list[str], env: dict[str, str], stopped: threading.Event | None = None) -> int:
    """The SuperNode in the foreground. SIGINT / SIGTERM / SIGHUP stop it and every ClientApp process it started
    (SIGTERM, then SIGKILL) within 15 s, then the worker; the site's ledger and released updates are on disk, so
    it simply rejoins."""
    _SUPERNODE_TAIL.clear()
    output = _SupernodeOutput()
    try:
        return _run_foreground(cmd, "Start the site again with the same command: it rejoins the run and never "
                                    "spends privacy twice on a round it already trained.",
                               env=env, on_output=output, was_stopped=stopped, echo=False)
    finally:
        output.finish()


if __name__ == "__main__":
    sys.exit(main())
