"""The site worker and its socket: what crosses it, who may use it, and what happens when it fails.

The worker runs in a thread of the test on a temporary socket (the real class, with stand-in handlers where the
training is not the point). Attacks, each next to its defence: hostile frames (oversized, malformed, cut short,
stalled), a socket planted in the worker's place or left open to others, a stale socket, a worker that dies in
the middle of a request (the ClientApp trains once itself and the ledger counts the round once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedtl.errors import SiteWorkerError
from fedtl.federation import worker_link as link
from fedtl.federation.worker import SiteWorker
from tests.conftest import write_small_medmnist

ROOT = Path(__file__).resolve().parents[3]


def _site(tmp_path: Path, epsilon: float = 3.0, seed: int = 1) -> Path:
    images = tmp_path / "images.npz"
    if not images.exists():
        write_small_medmnist(images, n_train=40, n_val=4, n_test=4, seed=seed)
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps({"name": "st-mary", "state-dir": str(tmp_path / "state"),
                                   "data": {"format": "medmnist", "path": str(images), "image-size": 28},
                                   "privacy": {"target-epsilon": epsilon, "delta": 1e-5}}))
    return path


class Recorder:
    """Stand-in handlers: record each call, answer with a small RecordDict."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def handlers(self) -> dict:
        def train(content, run_config, node_config, run_id, node_id, received_at):
            assert received_at <= time.monotonic()  # when the request reached the worker (late_reason's clock)
            self.calls.append(("train", content, run_config, node_config, run_id, node_id))
            return RecordDict({"metrics": MetricRecord({"served": 1.0})})

        return {"train": train, "evaluate": train}


@contextlib.contextmanager
def running(site: Path, handlers: dict, **kwargs):
    worker = SiteWorker(site, handlers=handlers, **kwargs)
    worker.bind()
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.close()
        thread.join(5)


def _content() -> RecordDict:
    return RecordDict({"config": ConfigRecord({"server-round": 1, "total-rounds": 4, "num-classes": 2}),
                       "arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})})


def _forward(worker: SiteWorker, op: str = "train", run_config=None):
    return link.forward(op, _content(), site_config=worker.site_config, state_dir=worker.site.state_dir,
                        run_config=run_config or {"train.epochs": 2}, run_id=5, node_id=7)


def test_a_message_crosses_the_socket_in_flowers_serialization_and_back(tmp_path):
    rec = Recorder()
    with running(_site(tmp_path), rec.handlers()) as worker:
        reply = _forward(worker, run_config={"train.epochs": 2, "privacy.target-epsilon": 3.0, "data.path": "x"})
        assert dict(reply["metrics"]) == {"served": 1.0}
        (op, content, run_config, node_config, run_id, node_id), = rec.calls
        assert op == "train" and (run_id, node_id) == (5, 7)
        assert run_config == {"train.epochs": 2, "privacy.target-epsilon": 3.0, "data.path": "x"}
        assert node_config == {"site-config": worker.site_config}  # the worker's own site, never the caller's
        assert dict(content["config"]) == dict(_content()["config"])
        assert np.array_equal(content["arrays"]["w"].numpy(), np.arange(3, dtype=np.float32))
        status = link.ping(worker.path)
        assert status["pid"] == os.getpid() and status["site"] == "st-mary" and status["served"] == {"train": 1}
        # the socket only this user reaches: a 0700 folder, a 0600 socket
        assert worker.path.parent.stat().st_mode & 0o777 == 0o700 and worker.path.stat().st_mode & 0o777 == 0o600
    assert not worker.path.exists()  # removed when the worker stops


def _raw(worker: SiteWorker, data: bytes, close: bool = False) -> dict:
    with link.connect(worker.path, 5) as sock:
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
        header, _ = link.recv_frame(sock)
    return header


def _frame(header, body: bytes = b"", magic: bytes = link.MAGIC) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return link.PREFIX.pack(magic, len(head), len(body)) + head + body


def _train_header(worker: SiteWorker, **over) -> dict:
    return {"op": "train", "run-id": 1, "node-id": 2, "site-config": worker.site_config, "run-config": {}, **over}


@pytest.mark.parametrize("make, fragment", [
    (lambda w: _frame({"op": "ping"}, magic=b"HTTP"), "not a site-worker frame"),
    (lambda w: link.PREFIX.pack(link.MAGIC, link.MAX_HEADER + 1, 0), "frame header of 1048577 bytes"),
    (lambda w: link.PREFIX.pack(link.MAGIC, 2, 1 << 40), "frame body of 1099511627776 bytes, above the limit"),
    (lambda w: _frame(b"\xff{not json"), "frame header is not JSON"),
    (lambda w: _frame([1, 2]), "must be a JSON object, got list"),
    (lambda w: _frame(_train_header(w), b"\x0a\xff\xff\xff\xffgarbage"), "not a serialized RecordDict"),
    (lambda w: _frame(_train_header(w, **{"run-config": {"a": {"nested": 1}}})), "`run-config` must map names"),
    (lambda w: _frame(_train_header(w, **{"run-id": "1"})), "`run-id` and `node-id` must be integers"),
    (lambda w: _frame(_train_header(w, **{"site-config": "/elsewhere/site.toml"})), "this worker serves"),
    (lambda w: _frame({"op": "shell"}), "unknown op 'shell'"),
])
def test_a_hostile_frame_gets_an_error_reply_and_the_worker_keeps_serving(tmp_path, make, fragment):
    rec = Recorder()
    with running(_site(tmp_path), rec.handlers()) as worker:
        reply = _raw(worker, make(worker))
        assert reply["ok"] is False and reply["accepted"] is False and fragment in reply["error"], reply
        assert rec.calls == []  # nothing reached a handler
        assert link.ping(worker.path)["served"] == {}
        assert _forward(worker) is not None  # and it still serves


def test_a_frame_cut_short_or_never_sent_does_not_block_the_worker(tmp_path):
    rec = Recorder()
    with running(_site(tmp_path), rec.handlers(), frame_timeout=0.5) as worker:
        assert "closed after" in _raw(worker, _frame(_train_header(worker), b"x" * 100)[:-40], close=True)["error"]
        with link.connect(worker.path, 5) as stalled:  # connects and sends nothing
            assert link.ping(worker.path)["pid"] == os.getpid()  # answered meanwhile
            header, _ = link.recv_frame(stalled)
            assert "timed out" in header["error"]
        assert _forward(worker) is not None and len(rec.calls) == 1


def _attacker_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    sock.settimeout(0.2)
    return sock


@pytest.mark.parametrize("plant, fragment", [
    ("symlink", "is not a socket (a link or file in its place)"),
    ("socket-0666", "has mode 0o666, expected 0o600"),
    ("dir-0755", "has mode 0o755, expected 0o700"),
    ("regular-file", "is not a socket"),
])
def test_a_planted_or_open_socket_is_refused_and_the_message_served_in_process(tmp_path, caplog, plant, fragment):
    rec = Recorder()
    with running(_site(tmp_path), rec.handlers()) as worker:
        elsewhere = _attacker_socket(Path(f"/tmp/fedtl-attacker-{os.getpid()}.sock"))
        try:
            if plant == "symlink":
                worker.path.unlink()
                worker.path.symlink_to(f"/tmp/fedtl-attacker-{os.getpid()}.sock")
            elif plant == "socket-0666":
                worker.path.chmod(0o666)
            elif plant == "dir-0755":
                worker.path.parent.chmod(0o755)
            else:
                worker.path.unlink()
                worker.path.write_text("not a socket")
            with caplog.at_level(logging.WARNING):
                assert _forward(worker) is None  # the ClientApp serves it itself
            assert fragment in caplog.text and "serving this train message in this process" in caplog.text
            with pytest.raises(TimeoutError):
                elsewhere.accept()  # nothing connected to the planted socket
            assert rec.calls == []
        finally:
            elsewhere.close()
            Path(f"/tmp/fedtl-attacker-{os.getpid()}.sock").unlink(missing_ok=True)


def test_a_stale_socket_is_replaced_a_live_worker_or_a_foreign_file_is_not(tmp_path):
    site = _site(tmp_path)
    path = link.socket_path(tmp_path / "state")
    path.parent.mkdir(mode=0o700, parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path) if len(str(path)) < 100 else pytest.skip("temporary path too long for a plain bind"))
    stale.close()  # a killed worker's socket file: nobody listens
    rec = Recorder()
    with running(site, rec.handlers()) as worker:
        assert _forward(worker) is not None
        with pytest.raises(SiteWorkerError, match=r"already serves st-mary"):
            SiteWorker(site, handlers={}).bind()
        assert _forward(worker) is not None  # the live one was left alone
    path.write_text("an operator's file")
    with pytest.raises(SiteWorkerError, match="exists and is not a socket"):
        SiteWorker(site, handlers={}).bind()
    assert path.read_text() == "an operator's file"


def test_a_failing_handler_is_an_error_reply_and_the_caller_falls_back(tmp_path, caplog):
    def broken(*_args, **_kwargs):
        raise RuntimeError("out of memory")

    with running(_site(tmp_path), {"train": broken, "evaluate": broken}) as worker:
        with caplog.at_level(logging.WARNING):
            assert _forward(worker) is None
        assert "RuntimeError: out of memory" in caplog.text and "in this process" in caplog.text
        assert link.ping(worker.path)["pid"] == os.getpid()
    assert _forward(worker) is None  # no worker at all: served in process too


def test_the_worker_reloads_its_site_when_site_toml_or_the_data_change(tmp_path):
    """Never stale: a changed budget in site.toml and changed images are what the next request sees."""
    from fedtl.federation import deployment

    def seen(content, run_config, node_config, run_id, node_id, received_at):
        path = node_config["site-config"]
        return RecordDict({"m": MetricRecord({
            "eps": deployment.load_site_config(path).privacy.target_epsilon,
            "n": float(len(deployment._site_images(path).images)),
            "fp": float(int(deployment._site_images(path).images.fingerprint[:8], 16))})})

    site = _site(tmp_path, epsilon=3.0)
    with running(site, {"train": seen, "evaluate": seen}) as worker:
        first = dict(_forward(worker)["m"])
        assert dict(_forward(worker)["m"]) == first and first["eps"] == 3.0
        _site(tmp_path, epsilon=1.5)  # the operator lowers the budget
        assert dict(_forward(worker)["m"])["eps"] == 1.5
        write_small_medmnist(tmp_path / "images.npz", n_train=40, n_val=4, n_test=4, seed=9)  # new images
        assert dict(_forward(worker)["m"])["fp"] != first["fp"]


# ---- the real ClientApp and the real training: a worker that dies mid-request --------------------------------
def _message(content: RecordDict, kind=MessageType.TRAIN) -> Message:
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=600.0, message_type=kind)
    return Message(content=content, metadata=meta)


def _warm_site(tmp_path: Path, monkeypatch) -> tuple[Path, RecordDict]:
    """A deployed site whose prefix features are cached (stand-in weights file and features: no backbone is
    built), and the server's first train message for it."""
    import torch

    from fedtl.backbones import get_spec
    from fedtl.config import FedTLConfig
    from fedtl.data.site_sources import load_site_data
    from fedtl.features import CacheKey, FeatureCache, shifted_view, split_key
    from fedtl.federation import deployment
    from fedtl.federation.records import to_record
    from fedtl.federation.site import preprocessing_for
    from fedtl.model import SuffixModel
    from fedtl.site_config import SiteConfig
    from fedtl.standardize import FeatureStandardizer

    site = _site(tmp_path)
    for cached in (deployment.load_site_config, deployment._site_images):
        cached.cache_clear()
    monkeypatch.setenv("FEDTL_WEIGHTS_DIR", str(tmp_path / "state" / "weights"))  # restored after the handler sets it
    cfg = FedTLConfig()
    spec = get_spec(cfg.model.backbone)
    weights = tmp_path / "state" / "weights" / spec.weights_file
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stand-in weights")
    sha = hashlib.sha256(b"stand-in weights").hexdigest()
    images = load_site_data(SiteConfig.load(site).data).images
    for k in range(cfg.train_views):  # every view a train request uses (train.views)
        view = shifted_view(images, k)
        key = CacheKey(spec.name, sha, preprocessing_for(cfg).key(), split_key(spec.recommended_cut, "avg"),
                       view.fingerprint)
        FeatureCache(tmp_path / "state" / "features").store(key, torch.randn(len(images), 16))
    suffix = SuffixModel(spec.name, sha, spec.recommended_cut, 16, 2, cfg.model, seed=cfg.train.seed)
    stats = FeatureStandardizer(torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64))
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "total-rounds": 4, "num-classes": 2,
                                                  "run-id": "r1", "backbone-sha256": sha, "pooling": "avg",
                                                  **stats.to_config()}),
                          "arrays": to_record(suffix.trainable_state())})
    return site, content


class _Killed(BaseException):
    """The worker dies here: its connection closes with no reply (what kill -9 looks like to the ClientApp)."""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after-training", "before-training"])
def test_a_worker_killed_mid_round_the_client_app_trains_once_and_the_ledger_counts_once(tmp_path, monkeypatch,
                                                                                         caplog, when):
    from fedtl.federation.apps import make_client_app
    from fedtl.federation.handlers import handle_train

    site, content = _warm_site(tmp_path, monkeypatch)
    trained = []

    def dies(content, run_config, node_config, run_id, node_id, received_at):
        if when == "after-training":  # the update is released and the ledger saved, then the worker dies
            trained.append(handle_train(content, run_config, node_config, run_id, received_at=received_at))
        raise _Killed()

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the dying thread's traceback
    context = Context(run_id=1, node_id=7, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    with running(site, {"train": dies, "evaluate": dies}):
        with caplog.at_level(logging.INFO):
            reply = make_client_app()(_message(content), context)
    assert "did not reply" in caplog.text and "serving this train message in this process" in caplog.text
    metrics = dict(reply.content["metrics"])
    assert metrics["declined"] == 0 and metrics["epsilon"] > 0, (metrics, dict(reply.content["info"]))
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1]  # spent once, whoever trained
    if when == "after-training":  # the ClientApp sent the worker's released update again, spending nothing
        assert "already trained; sending the update it released" in caplog.text
        sent, released = reply.content["arrays"], trained[0]["arrays"]
        assert all(np.array_equal(sent[k].numpy(), released[k].numpy()) for k in released)
        assert metrics["epsilon"] == dict(trained[0]["metrics"])["epsilon"]


@pytest.mark.slow
def test_the_worker_trains_with_the_same_handler_and_the_ledger_lock(tmp_path, monkeypatch):
    """A real train request served by the worker, then the same request in process: the second is a replay."""
    from fedtl.federation.apps import make_client_app

    site, content = _warm_site(tmp_path, monkeypatch)
    context = Context(run_id=1, node_id=7, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    with running(site, None) as worker:
        via_worker = make_client_app()(_message(content), context)
        assert link.ping(worker.path)["served"] == {"train": 1}
    in_process = make_client_app()(_message(content), context)  # no worker now: in process, same (run, round)
    for reply in (via_worker, in_process):
        assert dict(reply.content["metrics"])["declined"] == 0
    assert dict(via_worker.content["metrics"]) == dict(in_process.content["metrics"])
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1]


_FORWARDING_CLIENT = textwrap.dedent('''
    import json, sys
    from flwr.app import ArrayRecord, Array, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
    import numpy as np
    import clients.app
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=600.0, message_type=MessageType.TRAIN)
    content = RecordDict({"config": ConfigRecord({"server-round": 1}), "arrays": ArrayRecord({"w": Array(np.ones(2))})})
    context = Context(run_id=1, node_id=7, node_config={"site-config": sys.argv[1]}, state=RecordDict(), run_config={})
    reply = clients.app.app(Message(content=content, metadata=meta), context)
    print(json.dumps({"reply": dict(reply.content["metrics"]),
                      "imported": sorted(m for m in ("torch", "opacus", "scipy", "fedtl.training",
                                                     "fedtl.federation.handlers", "fedtl.federation.site")
                                         if m in sys.modules)}))
''')


@pytest.mark.slow
def test_a_forwarding_client_app_imports_neither_torch_nor_opacus_nor_the_training_code(tmp_path):
    rec = Recorder()
    with running(_site(tmp_path), rec.handlers()) as worker:
        out = subprocess.run([sys.executable, "-c", _FORWARDING_CLIENT, worker.site_config], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"reply": {"served": 1.0}, "imported": []}, (result, out.stderr[-2000:])
    assert len(rec.calls) == 1


def test_frames_are_bounded_both_ways():
    a, b = socket.socketpair()
    with a, b:
        link.send_frame(a, {"op": "ping"}, b"12345")
        assert link.recv_frame(b) == ({"op": "ping"}, b"12345")
        a.sendall(struct.pack(">4sIQ", link.MAGIC, 2, 10))
        with pytest.raises(link.FrameError, match="above the limit of 5"):
            link.recv_frame(b, max_body=5)
