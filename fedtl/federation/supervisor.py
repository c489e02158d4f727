"""`fedtl simulate`'s supervisor: the simulation runs in a child process tree that can always be stopped.

Flower's simulation runtime keeps a ServerApp thread polling and Ray re-parents its daemons and
workers; neither stops on a plain SIGINT. The supervisor is a small process (it imports neither
torch nor Flower) that starts ``fedtl simulate`` as a child in its own session, records every
process of that tree, and on SIGINT, SIGTERM or SIGHUP stops all of them within a bounded time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError

log = logging.getLogger(__name__)


def resumed_config(run_dir: Path) -> FedTLConfig:
    """The configuration an interrupted run was started with (its ``config.json``)."""
    path = Path(run_dir) / "config.json"
    try:
        flat = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{run_dir} is not a run directory (no config.json); nothing to resume.") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); cannot resume.") from exc
    flat["output.dir"], flat["output.resume"] = str(run_dir), True
    return FedTLConfig.from_run_config(flat)


# ---- the supervisor: `fedtl simulate` runs the simulation in a child it can always stop ---------------
CHILD_ENV = "FEDTL_SIMULATE_CHILD"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def supervise(argv: list[str], out: Path | None, grace: float = 8.0) -> int:
    """Run ``fedtl <argv>`` as a child in its own session and wait for it.

    SIGINT, SIGTERM and SIGHUP stop the child's whole process tree (SIGTERM to its process group,
    SIGKILL to the group and every recorded descendant after ``grace`` seconds) — Flower's ServerApp
    thread and Ray's workers included — and exit with 128 + the signal, saying how to resume.
    The child also dies if this supervisor is killed (``PR_SET_PDEATHSIG``).
    """
    env = dict(os.environ, **{CHILD_ENV: "1"})
    proc = subprocess.Popen([sys.executable, "-m", "fedtl.cli", *argv], env=env, start_new_session=True,
                            preexec_fn=die_with_parent(signal.SIGKILL), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = ProcessTreeWatcher(root=proc.pid)
    watcher.start()
    muted = threading.Event()  # once stopping, the dying tree's complaints are not the user's business
    pumps = [threading.Thread(target=_pump, args=(src, dst, muted), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for pump in pumps:
        pump.start()

    def handler(signum, _frame):
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        try:
            code = proc.wait()
            for pump in pumps:
                pump.join(timeout=5)
            return code
        except _Stop as stop:
            for sig in STOP_SIGNALS:  # a second signal must not interrupt the clean-up
                signal.signal(sig, signal.SIG_IGN)
            muted.set()
            t0 = time.monotonic()
            _stop_group(proc, watcher, grace)
            name = signal.Signals(stop.signum).name
            if out is not None and (out / "checkpoint.safetensors").exists() and not (out / "summary.json").exists():
                done = checkpoint_round(out)
                print(f"error: stopped by {name} after round {done} ({time.monotonic() - t0:.1f} s to stop every "
                      f"process); the run can be resumed: fedtl simulate --resume {out}", file=sys.stderr)
            else:
                print(f"error: stopped by {name}; every process it started was stopped.", file=sys.stderr)
            return 128 + stop.signum
    finally:
        watcher.stop_and_reap(grace=1.0)
        for sig, old in previous.items():
            signal.signal(sig, old)


def _pump(src, dst, muted: threading.Event) -> None:
    """Forward the child's output as it comes (progress bars included) until it ends or stopping starts."""
    fd = src.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        if not muted.is_set():
            dst.buffer.write(chunk) if hasattr(dst, "buffer") else dst.write(chunk.decode(errors="replace"))
            dst.flush()


def checkpoint_round(run_dir: Path) -> int | str:
    """The round of a run directory's checkpoint, read from the safetensors header alone (no torch)."""
    try:
        with open(Path(run_dir) / "checkpoint.safetensors", "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(min(size, 64 << 20)))
        return int(json.loads(header["__metadata__"]["fedtl"])["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _stop_group(proc: subprocess.Popen, watcher: ProcessTreeWatcher, grace: float) -> None:
    import psutil

    watcher.snapshot()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        procs = watcher.alive()
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(procs, timeout=grace if sig == signal.SIGTERM else 5)
        try:
            proc.wait(timeout=grace if sig == signal.SIGTERM else 5)
        except subprocess.TimeoutExpired:
            continue
        if not still:
            return


def die_with_parent(sig: int = signal.SIGKILL):
    """A ``preexec_fn`` (it runs in the child between fork and exec) that has Linux send the child ``sig`` when
    the thread that started it dies (``PR_SET_PDEATHSIG``): a launcher killed with SIGKILL, which can stop nothing
    itself, does not leave its SuperLink, SuperNode or run behind as orphans. A no-op where prctl is missing."""
    def preexec() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    return preexec


class ProcessTreeWatcher(threading.Thread):
    """Remembers every process under ``root`` (this process by default) — Ray's daemons and workers
    re-parent as they exit — so that when the simulation ends none is left running: each gets a
    grace period to exit on its own, then is terminated, then killed."""

    def __init__(self, interval: float = 0.5, root: int | None = None) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.root = root
        self.seen: dict[int, float] = {}
        self._stop_event = threading.Event()  # not `_stop`: that would shadow Thread._stop

    def snapshot(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root) if self.root else psutil.Process()
            family = root.children(recursive=True) + ([root] if self.root else [])
            for child in family:
                self.seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass

    def alive(self) -> list:
        import psutil

        out = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.snapshot()
            self._stop_event.wait(self.interval)

    def stop_and_reap(self, grace: float = 15.0) -> None:
        import psutil

        self.snapshot()
        self._stop_event.set()
        alive = self.alive()
        _, alive = psutil.wait_procs(alive, timeout=grace)
        for proc in alive:
            try:  # a process may be a zombie or gone by now: naming it must not fail the finished run
                name = " ".join(proc.cmdline()[:2])
            except psutil.Error:
                name = "exited"
            log.warning("Stopping leftover process %d (%s)", proc.pid, name)
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
