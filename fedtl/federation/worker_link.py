"""The site worker's socket: where it is, who may use it, and the frames that cross it.

A deployed site's long-lived worker (``fedtl.federation.worker``) listens on a Unix domain socket,
``<state-dir>/worker/worker.sock``, in a directory of mode 0700 with the socket at 0600, both owned by the
site's user; the kernel's peer credentials are checked on both ends, so only that user's processes talk to it.
A client refuses a socket that is not exactly that (a link planted in its place, another owner, wider modes).

One request per connection, in length-prefixed frames::

    frame  = "FTW1" | header length (u32, big-endian) | body length (u64) | header | body
    header = a JSON object (at most 1 MiB); body = bytes (at most ``MAX_BODY``), Flower's own protobuf
             serialization of a RecordDict (``flwr.common.serde``): no pickle crosses the socket

client → worker  {"op": "train" | "personalize" | "evaluate", "run-id", "node-id", "site-config", "run-config": {...}} + content
worker → client  {"accepted": true} at once (its reply comes when the site's one-at-a-time lock is free),
                 then {"ok": true, "pid": …} + the reply's content, or {"ok": false, "error": "…"}
``{"op": "ping"}`` is answered at once with the worker's pid, site and requests served.

This module is what the ClientApp imports to forward a message: Flower and the standard library only (no torch,
no opacus, no fedtl training code), so a ClientApp process that forwards costs only Flower's own start-up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtl.errors import SiteWorkerError

log = logging.getLogger(__name__)

MAGIC = b"FTW1"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER = 1 << 20
MAX_BODY = 64 << 20  # a train message carries a suffix of kilobytes (LoRA: a few MB); bigger ones stay in-process
DIR_NAME, SOCKET_NAME = "worker", "worker.sock"
ACK_TIMEOUT = 10.0  # seconds for a worker to accept a request: longer means it is not answering
REPLY_TIMEOUT_ENV = "FEDTL_WORKER_REPLY_TIMEOUT"  # seconds for its reply (default 1800: a cold site builds features)


class FrameError(SiteWorkerError):
    """A frame that is malformed, too large, or cut short."""


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir).resolve() / DIR_NAME / SOCKET_NAME


# ---- frames --------------------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, header: Mapping[str, Any], body: bytes = b"") -> None:
    head = json.dumps(dict(header)).encode()
    sock.sendall(PREFIX.pack(MAGIC, len(head), len(body)) + head)
    if body:
        sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise FrameError(f"the connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, max_body: int = MAX_BODY) -> tuple[dict[str, Any], bytes]:
    """(header, body) of one frame; FrameError, before anything large is allocated, for a frame out of bounds."""
    magic, head_len, body_len = PREFIX.unpack(_recv_exact(sock, PREFIX.size))
    if magic != MAGIC:
        raise FrameError(f"not a site-worker frame (magic {magic!r}, expected {MAGIC!r})")
    if head_len > MAX_HEADER:
        raise FrameError(f"frame header of {head_len} bytes, above the limit of {MAX_HEADER}")
    if body_len > max_body:
        raise FrameError(f"frame body of {body_len} bytes, above the limit of {max_body}")
    try:
        header = json.loads(_recv_exact(sock, head_len))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"frame header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FrameError(f"frame header must be a JSON object, got {type(header).__name__}")
    return header, _recv_exact(sock, body_len) if body_len else b""


def encode_content(content) -> bytes:
    """A RecordDict as Flower serializes it (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def decode_content(body: bytes):
    """The RecordDict of a frame's body; FrameError when it does not parse."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(body))
    except Exception as exc:  # protobuf's DecodeError, or a record Flower's serde refuses
        raise FrameError(f"frame body is not a serialized RecordDict ({type(exc).__name__}: {exc})") from None


# ---- who may use the socket ----------------------------------------------------------------------------------
def _ownership_problem(st: os.stat_result, what: str, expected_mode: int) -> str:
    """'' when ``st`` is owned by this user and open to no one else (no group or other bits); else why not."""
    if st.st_uid != os.getuid():
        return f"{what} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o077:
        return f"{what} has mode {oct(st.st_mode & 0o777)}, expected {oct(expected_mode)}"
    return ""


def private_dir_problem(st: os.stat_result, what: str) -> str:
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory (a link or file in its place)"
    return _ownership_problem(st, what, 0o700)


def socket_problem(path: Path) -> str:
    """'' when ``path`` is a socket only this user can reach: a 0700 directory of ours holding a 0600 socket of
    ours (no link); else why it is refused."""
    try:
        problem = private_dir_problem(os.lstat(path.parent), f"the worker directory {path.parent}")
        if problem:
            return problem
        st = os.lstat(path)
    except FileNotFoundError:
        return f"no site worker socket at {path}"
    except OSError as exc:
        return f"cannot inspect {path} ({exc})"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket (a link or file in its place)"
    return _ownership_problem(st, f"the socket {path}", 0o600)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux ``SO_PEERCRED``; None where unavailable)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def unix_address(path: Path, dir_fd: int | None = None) -> str:
    """An address ``bind``/``connect`` accept: the path, or, when it is longer than a socket address allows (about
    107 bytes), the same file reached through ``/proc/self/fd`` of its already-opened, already-checked folder."""
    if len(os.fsencode(str(path))) < 100 or dir_fd is None:
        return str(path)
    return f"/proc/self/fd/{dir_fd}/{path.name}"


def connect(path: Path, timeout: float) -> socket.socket:
    """A connection to the worker at ``path``, after every check above; SiteWorkerError (with the reason) if not."""
    problem = socket_problem(path)
    if problem:
        raise SiteWorkerError(problem)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(unix_address(path, dir_fd))
        uid = peer_uid(sock)
        if uid is not None and uid != os.getuid():
            raise SiteWorkerError(f"the process behind {path} runs as uid {uid}, not this user ({os.getuid()})")
    except OSError as exc:
        sock.close()
        raise SiteWorkerError(f"the site worker at {path} does not answer ({exc})") from None
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


def request(path: Path, header: Mapping[str, Any], body: bytes = b"", *, ack_timeout: float = ACK_TIMEOUT,
            reply_timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
    """Send one request and return the worker's (header, body); SiteWorkerError when it is absent, refuses, does
    not accept within ``ack_timeout`` or goes away before replying (a crash mid-request)."""
    if reply_timeout is None:
        reply_timeout = float(os.environ.get(REPLY_TIMEOUT_ENV, "1800"))
    with connect(path, ack_timeout) as sock:
        try:
            send_frame(sock, header, body)
            ack, _ = recv_frame(sock)
            if not ack.get("accepted"):
                raise SiteWorkerError(f"the site worker refused the request: {ack.get('error', ack)}")
            sock.settimeout(reply_timeout)
            reply, content = recv_frame(sock)
        except (OSError, FrameError) as exc:  # a timeout, or a worker gone mid-request (killed, crashed)
            raise SiteWorkerError(f"the site worker at {path} did not reply ({exc})") from None
    if not reply.get("ok"):
        raise SiteWorkerError(f"the site worker could not serve the request: {reply.get('error', reply)}")
    return reply, content


def ping(path: Path, timeout: float = 2.0) -> dict[str, Any]:
    """The worker's status (pid, site, requests served); SiteWorkerError when it does not answer."""
    header, _ = request(path, {"op": "ping"}, ack_timeout=timeout, reply_timeout=timeout)
    return header


def forward(op: str, content, *, site_config: str, state_dir: str | os.PathLike[str], run_config: Mapping[str, Any],
            run_id: int, node_id: int):
    """The reply content from this site's worker for a train/evaluate message, or None when the caller must serve
    it in its own process (one log line says why: no worker, not trustworthy, not answering, crashed)."""
    path = socket_path(state_dir)
    started = time.monotonic()
    try:
        body = encode_content(content)
        if len(body) > MAX_BODY:
            raise SiteWorkerError(f"the message is {len(body)} bytes, above the worker's limit of {MAX_BODY}")
        header = {"op": op, "run-id": int(run_id), "node-id": int(node_id), "site-config": str(site_config),
                  "run-config": dict(run_config)}
        reply, reply_body = request(path, header, body)
        result = decode_content(reply_body)
    except SiteWorkerError as exc:
        log.warning("Site worker not used (%s); serving this %s message in this process.", exc, op)
        return None
    log.info("%s message served by the site worker (pid %s) in %.2f s", op, reply.get("pid"),
             time.monotonic() - started)
    return result
