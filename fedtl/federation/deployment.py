"""A deployed data site: its own policy file, data, feature cache and ledger; backbone distribution.

The server pins the backbone by name and sha256. A site that holds the weights verifies the
hash; one that lacks them receives the file once through Flower messages, verifies it and keeps
it under ``<state-dir>/weights`` (looked up first from then on). A mismatch is refused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from fedtl.backbones import get_spec
from fedtl.backbones.registry import file_sha256, weights_candidates
from fedtl.config import FedTLConfig
from fedtl.errors import BackboneError
from fedtl.features import FeatureCache
from fedtl.federation.site import SiteData, preprocessing_for
from fedtl.model import TransferModel
from fedtl.privacy.policy import PrivacyPolicy, policy_for_site
from fedtl.site_config import SiteConfig

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def load_site_config(path: str) -> SiteConfig:
    site = SiteConfig.load(path)
    os.environ["FEDTL_WEIGHTS_DIR"] = str(site_weights_dir(site))  # the site's verified copy is looked up first
    return site


def site_weights_dir(site: SiteConfig) -> Path:
    return Path(site.state_dir) / "weights"


def site_policy(site: SiteConfig) -> PrivacyPolicy:
    """The site's own policy (site.toml alone): DP always on, its budget, caps and accountant."""
    return policy_for_site(site)


@functools.lru_cache(maxsize=2)
def _site_images(path: str):
    from fedtl.data.site_sources import load_site_data

    return load_site_data(load_site_config(path).data)


def deployed_site_data(cfg: FedTLConfig, model: TransferModel, site_config_path: str) -> SiteData:
    site = load_site_config(site_config_path)
    images = _site_images(site_config_path).images
    cache = FeatureCache(Path(site.state_dir) / "features")
    feats, hit = cache.get_or_build(model, preprocessing_for(cfg), images)
    import torch

    return SiteData(site.name, feats, torch.as_tensor(images.labels), hit)


# ---- backbone distribution -------------------------------------------------------------
def local_backbone_sha256(backbone: str) -> str:
    """sha256 of the first weights file this site would load for ``backbone`` ("" if none)."""
    spec = get_spec(backbone)
    candidates = list(weights_candidates(spec))
    if spec.name == "efficientnet_lite0":
        from fedtl.backbones.efficientnet import locate_lite0_weights

        try:
            candidates.append(locate_lite0_weights())
        except BackboneError:
            pass
    for path in candidates:
        if path.is_file():
            return file_sha256(path)
    return ""


def install_backbone(site: SiteConfig, backbone: str, pinned_sha256: str, payload: np.ndarray) -> Path:
    """Verify the received weights against the pinned hash and keep them (atomically) in the site's state."""
    spec = get_spec(backbone)
    data = np.ascontiguousarray(payload, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned_sha256:
        raise BackboneError(
            f"Received weights for `{backbone}` have sha256 {digest[:16]}…, but the server pinned "
            f"{pinned_sha256[:16]}…; refusing them."
        )
    target_dir = site_weights_dir(site)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / spec.weights_file
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("Installed %s weights (%d bytes, sha256 %s…) at %s", backbone, len(data), digest[:16], target)
    return target


def check_pinned(backbone: str, pinned_sha256: str) -> str:
    """'' when this site's weights match the pinned hash; else the reason to refuse."""
    local = local_backbone_sha256(backbone)
    if not local:
        return f"this site has no weights for `{backbone}`"
    if pinned_sha256 and local != pinned_sha256:
        return (f"this site's `{backbone}` weights have sha256 {local[:16]}…, the server pinned "
                f"{pinned_sha256[:16]}…: a different prefix, refusing to train")
    return ""
