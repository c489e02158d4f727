"""A deployed site's long-lived worker: torch, Opacus and the site's data loaded once, serving every message.

    python -m fedtl.federation.worker SITE_TOML [--exit-with-parent]

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process per message, which would pay the imports and
the loading of the site's data every time. ``fedtl-site start`` starts this worker first (and stops it with the
site); the ClientApp forwards train/evaluate messages to it over the site's private socket
(:mod:`fedtl.federation.worker_link`) and returns its reply, or serves the message itself when the worker is
absent or fails. The worker calls the same handlers (:mod:`fedtl.federation.handlers`) as the ClientApp: the
same validation of the server's content, the same site.toml as the only privacy authority, the same file-locked
ledger (a request the worker and a fallback both serve is spent once, the second is a replay).

What is kept warm: the imports, the site's parsed site.toml and its images (``deployment``'s caches). Before
each request it compares the size, mtime and inode of site.toml, of every file under its data and evaluation
paths and of its weights folder with those of the previous request and drops those caches on any change; the
feature cache, the evaluation split and the ledger are read from disk on every request as in-process.
Requests are served one at a time; a ping is answered at once. Once started, it builds the site's feature cache for
the next round in the background (:mod:`fedtl.federation.warm_up`), giving way to any request between views; a site
without the backbone's weights starts once the server's copy has arrived (unless a request came first).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fedtl.errors import FedTLError, SiteWorkerError
from fedtl.federation import worker_link as link
from fedtl.site_config import SiteConfig

log = logging.getLogger(__name__)

FRAME_TIMEOUT = 30.0  # seconds a client may take to send its request
MAX_CONNECTIONS = 8  # connections served at once (all but one wait for the lock); more are refused
WEIGHTS_POLL = 5.0  # seconds between looks for the backbone's weights when the site has none yet (the warm-up waits)


def _default_handlers() -> dict[str, Callable]:
    from fedtl.federation.handlers import handle_evaluate, handle_personalize, handle_train

    return {"train": lambda content, rc, nc, run_id, node_id, received_at:
            handle_train(content, rc, nc, run_id, received_at=received_at),
            "personalize": lambda content, rc, nc, run_id, node_id, received_at:
            handle_personalize(content, rc, nc, node_id),
            "evaluate": lambda content, rc, nc, run_id, node_id, received_at: handle_evaluate(content, rc, nc, node_id)}


class SiteWorker:
    """Serves one site's train/evaluate requests on ``<state-dir>/worker/worker.sock`` (see the module notes)."""

    def __init__(self, site_config: str | os.PathLike[str], *, handlers: dict[str, Callable] | None = None,
                 max_body: int = link.MAX_BODY, frame_timeout: float = FRAME_TIMEOUT) -> None:
        self.site_config = str(Path(site_config).resolve())
        self.site = SiteConfig.load(self.site_config)
        self.path = link.socket_path(self.site.state_dir)
        self.handlers = handlers if handlers is not None else _default_handlers()
        self.max_body, self.frame_timeout = max_body, frame_timeout
        self.served: collections.Counter[str] = collections.Counter()
        self.weights_poll = WEIGHTS_POLL
        self._lock = threading.Lock()  # one request (or one warm-up step) at a time
        self._waiting = 0  # requests waiting for the lock: the warm-up gives way to them
        self._waiting_guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._freshness: tuple | None = None

    # ---- the socket ------------------------------------------------------------------------------------------
    def bind(self) -> None:
        """Listen on the site's socket: a 0700 directory of ours, the socket bound 0600 under a temporary name and
        renamed over the path, so a stale socket of a killed worker is replaced atomically. Refuses a path held by
        a live worker, by something that is not a socket, or a directory another user owns."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            st = os.fstat(dir_fd)
            if st.st_uid != os.getuid():
                raise SiteWorkerError(f"{folder} is owned by uid {st.st_uid}, not this user; remove it and start again")
            if st.st_mode & 0o077:
                os.fchmod(dir_fd, 0o700)  # ours: made private
            self._take_over_stale(dir_fd)
            tmp = f".{link.SOCKET_NAME}.{os.getpid()}"
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # created 0600: never reachable by others, not even for an instant
            try:
                sock.bind(link.unix_address(folder / tmp, dir_fd))
            finally:
                os.umask(old_umask)
            os.chmod(tmp, 0o600, dir_fd=dir_fd)
            sock.listen(MAX_CONNECTIONS)
            os.replace(tmp, link.SOCKET_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            self._inode = os.stat(link.SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False).st_ino
        finally:
            os.close(dir_fd)
        sock.settimeout(1.0)  # the accept loop looks at its stop flag every second
        self._sock = sock
        log.info("Site worker for %s (pid %d) listening on %s", self.site.name, os.getpid(), self.path)

    def _take_over_stale(self, dir_fd: int) -> None:
        try:
            st = os.stat(link.SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        import stat as stat_

        if not stat_.S_ISSOCK(st.st_mode):
            raise SiteWorkerError(f"{self.path} exists and is not a socket; remove it and start the site again")
        try:
            status = link.ping(self.path, timeout=2.0)
        except SiteWorkerError:
            log.info("Replacing the stale socket %s (no worker answers on it)", self.path)
            return
        raise SiteWorkerError(f"a site worker (pid {status.get('pid')}) already serves {status.get('site')} on "
                              f"{self.path}; stop it first (or start this site with --no-worker)")

    def close(self) -> None:
        """Stop listening; remove the socket file if it is still ours."""
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() at once (Linux)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        try:
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    # ---- serving ---------------------------------------------------------------------------------------------
    def serve_forever(self, parent_pid: int | None = None) -> None:
        """Accept connections until :meth:`close` (or until ``parent_pid`` is no longer this process's parent)."""
        if self._sock is None:
            self.bind()
        while not self._stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("Site worker: its launcher (pid %d) is gone; stopping.", parent_pid)
                break
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                with conn:
                    self._reply_error(conn, f"the site worker is serving {MAX_CONNECTIONS} connections already")
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                uid = link.peer_uid(conn)
                if uid is not None and uid != os.getuid():  # the 0700 folder already keeps others out
                    log.error("Site worker: refused a connection from uid %d", uid)
                    return
                conn.settimeout(self.frame_timeout)
                try:
                    header, body = link.recv_frame(conn, self.max_body)
                except (SiteWorkerError, OSError) as exc:
                    log.warning("Site worker: refused a request: %s", exc)
                    self._reply_error(conn, f"bad request: {exc}")
                    return
                self._answer(conn, header, body)
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket, header: dict, body: bytes) -> None:
        op = header.get("op")
        if op == "ping":
            link.send_frame(conn, {"accepted": True})
            link.send_frame(conn, {"ok": True, "pid": os.getpid(), "site": self.site.name,
                                   "site-config": self.site_config, "served": dict(self.served)})
            return
        if op not in self.handlers:
            self._reply_error(conn, f"unknown op {op!r}; expected ping, train, personalize or evaluate")
            return
        try:
            request = self._parse(header, body)
        except SiteWorkerError as exc:
            log.warning("Site worker: refused a %s request: %s", op, exc)
            self._reply_error(conn, str(exc))
            return
        try:
            link.send_frame(conn, {"accepted": True})
        except OSError:
            return  # the client went away before it was served: nothing to do
        arrived = time.monotonic()  # a train request that waited here past the server's window is declined
        with self._waiting_for_lock():
            started = time.monotonic()
            try:
                self._refresh()
                content = self.handlers[op](*request, received_at=arrived)
                reply_body = link.encode_content(content)
            except Exception as exc:  # never crash the worker: the ClientApp serves the message itself
                log.exception("Site worker: the %s request failed", op)
                self._reply_error(conn, f"{type(exc).__name__}: {exc}")
                return
            self.served[op] += 1
        log.info("Site worker: %s request served in %.2f s", op, time.monotonic() - started)
        try:
            link.send_frame(conn, {"ok": True, "pid": os.getpid()}, reply_body)
        except OSError as exc:
            log.warning("Site worker: the ClientApp went away before the reply (%s)", exc)

    @contextlib.contextmanager
    def _waiting_for_lock(self) -> Iterator[None]:
        """The request lock, counted while waited for (so the warm-up stops at its next step)."""
        with self._waiting_guard:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._waiting_guard:
                self._waiting -= 1
        try:
            yield
        finally:
            self._lock.release()

    def warm_up(self) -> None:
        """Build the feature-cache entries the site's next rounds will read (:mod:`fedtl.federation.warm_up`), one
        view at a time under the request lock, before the first request needs them. Stops between views when a
        request is waiting or the worker is closing; never fails the worker (a failure is logged, and the request
        builds what it needs as it always did)."""
        from fedtl.federation.warm_up import awaiting_weights, warm_up_steps

        try:
            with self._lock:
                self._refresh()
                steps = warm_up_steps(self.site_config)
                pending = not steps and awaiting_weights(self.site_config)
        except Exception as exc:  # noqa: BLE001 - an optimization: the first request reports real problems
            log.warning("Site worker: not warming the feature cache: %s", exc)
            return
        if pending:
            steps = self._steps_once_weights_arrive()
        started, built = time.monotonic(), 0
        for what, build in steps:
            if self._stop.is_set() or self._waiting:
                log.info("Site worker: a request came before the feature cache was warm; it builds the rest.")
                return
            with self._lock:
                step = time.monotonic()
                try:
                    _, hit = build()
                except Exception as exc:  # noqa: BLE001 - as above
                    log.warning("Site worker: warming the feature cache stopped: %s", exc)
                    return
            if not hit:
                built += 1
                log.info("Site worker: feature cache: %s built in %.1f s", what, time.monotonic() - step)
        if steps:
            log.info("Site worker: the feature cache is warm (%d of %d entries built, %.1f s)", built, len(steps),
                     time.monotonic() - started)

    def _steps_once_weights_arrive(self) -> list:
        """The warm-up's steps once the backbone's weights are at the site (the server sends them before round 1,
        through the ClientApp, which keeps them in the site's state dir); checked every :attr:`weights_poll` s.
        Nothing when a request comes first (it builds what it needs, as before) or the worker closes."""
        from fedtl.federation.warm_up import warm_up_steps

        log.info("Site worker: no backbone weights at this site yet; the feature cache is warmed when they arrive.")
        while not self._stop.wait(self.weights_poll):
            if self._waiting or sum(self.served.values()):
                return []
            try:
                with self._lock:
                    steps = warm_up_steps(self.site_config)
            except Exception as exc:  # noqa: BLE001 - as in warm_up
                log.warning("Site worker: not warming the feature cache: %s", exc)
                return []
            if steps:
                log.info("Site worker: the backbone's weights arrived; warming the feature cache.")
                return steps
        return []

    def _parse(self, header: dict, body: bytes) -> tuple:
        if str(header.get("site-config", "")) != self.site_config:
            raise SiteWorkerError(f"this worker serves {self.site_config}, not {header.get('site-config')!r}")
        run_config = header.get("run-config")
        if not isinstance(run_config, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in run_config.items()):
            raise SiteWorkerError("`run-config` must map names to strings, numbers or booleans")
        run_id, node_id = header.get("run-id"), header.get("node-id")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (run_id, node_id)):
            raise SiteWorkerError(f"`run-id` and `node-id` must be integers, got {run_id!r}, {node_id!r}")
        content = link.decode_content(body)
        return content, run_config, {"site-config": self.site_config}, run_id, node_id

    def _reply_error(self, conn: socket.socket, error: str) -> None:
        try:
            link.send_frame(conn, {"accepted": False, "ok": False, "error": error})
        except OSError:
            pass

    # ---- freshness -------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Drop the loaded site.toml and images when any file they came from changed (module notes)."""
        key = self._fingerprint()
        if key == self._freshness:
            return
        if self._freshness is not None:
            log.info("Site worker: site.toml, the site's data or its weights changed; reloading them.")
        if "fedtl.federation.deployment" in sys.modules:
            from fedtl.backbones.registry import _build_cached
            from fedtl.federation import deployment

            for cached in (deployment.load_site_config, deployment._site_images, deployment._site_eval_images,
                           deployment._held_out_images, _build_cached):
                cached.cache_clear()
        try:
            self.site = SiteConfig.load(self.site_config)
        except FedTLError as exc:  # the handler reports it the way the in-process path does
            log.error("Site worker: %s", exc)
        self._freshness = self._fingerprint()  # the paths of the site.toml just read

    def _fingerprint(self) -> tuple:
        paths = [Path(self.site_config), Path(self.site.state_dir) / "weights"]
        for data in (self.site.data, self.site.evaluation.data):
            if data is not None:
                paths += [data.path] + ([data.labels] if data.labels is not None else [])
        out = []
        for path in paths:
            out.append(_stat(path))
            if path.is_dir():
                for root, dirs, files in os.walk(path):
                    dirs.sort()
                    out.extend((name, _stat(Path(root) / name)) for name in sorted(files))
        return tuple(out)


def _stat(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtl.federation.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("site_config")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the launcher that started it exits")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s site-worker %(levelname)s %(message)s")
    parent = os.getppid() if args.exit_with_parent else None
    try:
        worker = SiteWorker(args.site_config)
        worker.bind()
    except FedTLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    def stop(_signum, _frame):
        worker.close()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    _preload(worker)
    threading.Thread(target=worker.warm_up, name="site-worker-warm-up", daemon=True).start()
    try:
        worker.serve_forever(parent_pid=parent)
    finally:
        worker.close()
    return 0


def _preload(worker: SiteWorker) -> None:
    """Import what a request needs (torch, Opacus, the handlers) and load the site's images, before the first one."""
    started = time.monotonic()
    import fedtl.federation.handlers  # noqa: F401 - torch, Flower, fedtl's training code
    import fedtl.privacy.engine  # noqa: F401 - opacus (and SciPy through it)  # pyflakes: ignore
    from fedtl.config import FedTLConfig
    from fedtl.federation import deployment

    try:
        worker._refresh()
        deployment.cached_site(FedTLConfig(), worker.site_config, 2)  # images, feature cache, weights hash
    except Exception as exc:  # noqa: BLE001 - reported again, the in-process way, by the first request
        log.error("Site worker: cannot load the site's data yet: %s", exc)
    log.info("Site worker for %s ready in %.1f s", worker.site.name, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
