"""Process management for the operator and site launchers: a command in its own process group, logged and
always stopped (with every descendant); a foreground command that stops cleanly on SIGINT / SIGTERM / SIGHUP."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fedtl.errors import FederationError

log = logging.getLogger(__name__)


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run_foreground(cmd: list[str], stopped: str = "", grace: float = 8.0, *, env: Mapping[str, str] | None = None,
                    on_output: Callable[[str], None] | None = None, was_stopped: threading.Event | None = None,
                    echo: bool = True) -> int:
    """Run ``cmd`` until it exits. SIGINT, SIGTERM or SIGHUP to this process stop it and every
    descendant within ``grace`` + 5 seconds (SIGTERM, then SIGKILL), print ``stopped``, set ``was_stopped`` and
    return 128 + the signal. This process killed outright (SIGKILL), the command gets SIGTERM from the kernel
    (``die_with_parent``) instead of running on as an orphan. With ``on_output`` the command's stdout and stderr
    are copied to this process's stdout line by line and each line is passed to ``on_output`` as well (a launcher
    that explains the command's failures); with ``echo=False`` only passed, ``on_output`` printing what it keeps."""
    from fedtl.federation.supervisor import die_with_parent

    if on_output is None:
        proc = subprocess.Popen(cmd, start_new_session=True, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
        reader = None
    else:
        proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                                preexec_fn=die_with_parent(signal.SIGTERM))
        reader = threading.Thread(target=_copy_lines, args=(proc.stdout, on_output, echo), daemon=True)
        reader.start()

    def forward(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = proc.wait()
        if reader is not None:
            reader.join(5.0)  # the rest of its output (a ClientApp that outlives it may hold the pipe: bounded)
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128+N
    except KeyboardInterrupt as stop:
        for sig in previous:  # a second signal must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        terminate_tree(proc, grace)
        signum = int(stop.args[0]) if stop.args and isinstance(stop.args[0], int) else int(signal.SIGINT)
        if was_stopped is not None:
            was_stopped.set()
        # how a service is stopped (a long-lived SuperLink or site): said plainly, not as an error; the exit code
        # stays 128 + the signal, as a shell reports it
        print(f"stopped by {signal.Signals(signum).name}; every process it started was stopped. {stopped}".rstrip(),
              file=sys.stderr)
        return 128 + signum
    finally:
        if proc.poll() is None:
            terminate_tree(proc, 5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _copy_lines(stream: IO[str], on_output: Callable[[str], None], echo: bool = True) -> None:
    for line in stream:
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        on_output(line)


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open together while they are chosen)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
