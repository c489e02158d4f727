"""A deployed data site: its own policy file, data, feature cache and ledger; backbone distribution.

The server pins the backbone by name and sha256. A site that holds the weights verifies the
hash; one that lacks them receives the file once through Flower messages and keeps it under
``<state-dir>/weights`` (looked up first from then on). A mismatch is refused.

Received weights are a file from a stranger: they are accepted only when the pinned hash is on the
site's own allow-list (``backbone.allowed-sha256`` in site.toml; by default the published hash of
each registered backbone that has one), only below ``backbone.max-weights-mb`` (checked before the
payload is deserialized or hashed), only when their sha256 equals the pin, and never in place of a
file the site already holds (created with a hard link, which fails rather than replaces).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedtl.backbones import available, get_spec
from fedtl.backbones.registry import file_sha256, weights_candidates
from fedtl.config import FedTLConfig
from fedtl.errors import BackboneError, FedTLError
from fedtl.features import CacheKey, FeatureCache, split_key, stack_views, view_features
from fedtl.federation.site import SiteData, preprocessing_for
from fedtl.federation.site_split import evaluation_split, held_out_rows
from fedtl.model import SuffixModel, TransferModel
from fedtl.privacy.policy import PrivacyPolicy, policy_for_site
from fedtl.site_config import SiteConfig

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NPY_HEADER_SLACK = 4096  # bytes a serialized 1-d uint8 array may carry beyond its payload (the .npy header)


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
    """The site's training data as prefix features, without the images it holds out for evaluation."""
    import torch

    site = load_site_config(site_config_path)
    images = _site_images(site_config_path).images
    cache = FeatureCache(Path(site.state_dir) / "features")
    pre = preprocessing_for(cfg)
    feats, hit = view_features(lambda d: cache.get_or_build(model, pre, d), images, cfg.train_views)
    feats, labels = _without_holdout(site, images, feats, torch.as_tensor(images.labels))
    return SiteData(site.name, feats, labels, hit)


def _without_holdout(site: SiteConfig, images, feats, labels):
    """Training features and labels: every image but those the site holds out for evaluation."""
    if site.evaluation.enabled and site.evaluation.holdout:
        import torch

        keep = torch.as_tensor(evaluation_split(site, images)["train"], dtype=torch.long)
        return feats[keep], labels[keep]
    return feats, labels


@functools.lru_cache(maxsize=2)
def _site_eval_images(path: str):
    from fedtl.data.site_sources import load_site_data

    return load_site_data(load_site_config(path).evaluation.data)


def deployed_eval_data(cfg: FedTLConfig, model: TransferModel, site_config_path: str):
    """The site's evaluation splits as prefix features, or None when it does not evaluate."""
    site = load_site_config(site_config_path)
    if not site.evaluation.enabled:
        return None
    images, split = _evaluation_images(site, site_config_path)
    cache = FeatureCache(Path(site.state_dir) / "features")
    pre = preprocessing_for(cfg)
    feats, _ = stack_views(lambda k: cache.get_or_build(model, replace(pre, view=k), images), cfg.eval_views)
    return _eval_data(site, images, split, feats)


def _evaluation_images(site: SiteConfig, site_config_path: str):
    """The images the site evaluates on and its validation / test rows among them. With ``holdout``, the held-out
    images alone (the stored split's validation then test images), so the test-time views are computed for them
    and not for every training image."""
    if not site.evaluation.holdout:
        read = _site_eval_images(site_config_path)
        split = evaluation_split(site, read.images, read.splits)
        return read.images, {"val": split["val"], "test": split["test"]}
    split = evaluation_split(site, _site_images(site_config_path).images)
    held = tuple(held_out_rows(split))
    rows = list(range(len(held)))
    return _held_out_images(site_config_path, held), {"val": rows[:len(split["val"])], "test": rows[len(split["val"]):]}


@functools.lru_cache(maxsize=2)
def _held_out_images(path: str, held: tuple[int, ...]):
    """The site's held-out images, kept like the site's images (one copy and one fingerprint per split, not one
    per evaluation request); the site worker clears it with them."""
    return _site_images(path).images.subset(np.asarray(held, dtype=np.int64))


def _eval_data(site: SiteConfig, images, split: dict[str, list[int]], feats):
    import torch

    from fedtl.federation.site import SiteEvalData

    labels = torch.as_tensor(images.labels)
    return SiteEvalData(site.name, {s: (feats[torch.as_tensor(split[s], dtype=torch.long)],
                                        labels[torch.as_tensor(split[s], dtype=torch.long)]) for s in ("val", "test")})


def _warm(cfg: FedTLConfig, site: SiteConfig, images, num_classes: int, views: int = 1, test_time: bool = False):
    """(SuffixModel, features of ``images``) from the site's feature cache without the backbone, or None.

    The cache key is the one a build would compute: the backbone's name, the sha256 of the weights file this
    site would load (the same file and hash a build checks, so the server's pin is compared with it exactly as
    before), the preprocessing, the split point and the data's fingerprint. An entry exists only for a key a
    build produced, so a hit means these weights, this split and these images; the feature width is the
    entry's. With ``views`` > 1 every view's entry must be cached: ``(N, views, D)`` — training views
    (``train.views``), or with ``test_time`` the evaluation's (``evaluation.views``).
    """
    weights_sha256 = head_only_weights(cfg)
    if not weights_sha256:
        return None
    cache = FeatureCache(Path(site.state_dir) / "features")
    pre = preprocessing_for(cfg)

    def cached(data, view: int = 0):
        feats = cache.load(feature_key(cfg, weights_sha256, replace(pre, view=view), data), len(data))
        if feats is None or feats.ndim != 2:
            raise LookupError  # not cached (or not head-only features): the caller builds, as a cold site
        return feats, True

    try:
        feats, _ = stack_views(lambda k: cached(images, k), views) if test_time else view_features(cached, images, views)
    except LookupError:
        return None
    model = SuffixModel(get_spec(cfg.model.backbone).name, weights_sha256, cut_point(cfg), int(feats.shape[-1]), num_classes,
                        cfg.model, seed=cfg.train.seed)
    return model, feats


def cut_point(cfg: FedTLConfig) -> str:
    """The prefix's last unit: ``model.cut-after``, or the backbone's recommended cut ('' = the whole network)."""
    return get_spec(cfg.model.backbone).recommended_cut if cfg.model.cut_after == "auto" else cfg.model.cut_after


def head_only_weights(cfg: FedTLConfig) -> str:
    """The sha256 of the weights this site would load when ``cfg``'s prefix features can be cached and found without
    the backbone (the head-only suffix, a named cut); '' otherwise: adapters in the suffix, the whole network as
    prefix (its last unit is named by the build), or no weights at the site yet."""
    if cfg.adapters.kind != "none" or not cut_point(cfg):
        return ""
    return local_backbone_sha256(get_spec(cfg.model.backbone).name)


def feature_key(cfg: FedTLConfig, weights_sha256: str, pre, data) -> CacheKey:
    """The key a build of ``data``'s prefix features stores them under (:func:`fedtl.features.cache_key`, without
    the model): backbone, weights, preprocessing, cut and pooling, the data's fingerprint."""
    return CacheKey(get_spec(cfg.model.backbone).name, weights_sha256, pre.key(), split_key(cut_point(cfg),
                    cfg.model.pooling), data.fingerprint)


def cached_site(cfg: FedTLConfig, site_config_path: str, num_classes: int) -> tuple[SuffixModel, SiteData] | None:
    """A site whose prefix features are cached and whose suffix is the head alone: the suffix model and its
    training data (hold-out removed), without building (or importing) the backbone; ``None`` when the
    backbone is needed (no cache entry yet, adapters on, the whole network as prefix), and the caller builds
    it as a cold site does."""
    import torch

    site = load_site_config(site_config_path)  # first: its weights dir is where the weights are looked up first
    images = _site_images(site_config_path).images
    warm = _warm(cfg, site, images, num_classes, cfg.train_views)  # training: every view (train.views)
    if warm is None:
        return None
    model, feats = warm
    feats, labels = _without_holdout(site, images, feats, torch.as_tensor(images.labels))
    return model, SiteData(site.name, feats, labels, True)


def cached_eval_site(cfg: FedTLConfig, site_config_path: str, num_classes: int):
    """Like :func:`cached_site` for an evaluation request: (SuffixModel, SiteEvalData) or None."""
    site = load_site_config(site_config_path)
    if not site.evaluation.enabled:
        return None
    images, split = _evaluation_images(site, site_config_path)
    warm = _warm(cfg, site, images, num_classes, cfg.eval_views, test_time=True)
    if warm is None:
        return None
    model, feats = warm
    return model, _eval_data(site, images, split, feats)


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


def allowed_weights_sha256(site: SiteConfig) -> tuple[str, ...]:
    """Hashes of weights this site accepts from a server: its ``backbone.allowed-sha256``, or, when the key is
    absent, the published sha256 of every registered backbone that has one (``[]`` accepts none)."""
    if site.backbone.allowed_sha256 is not None:
        return site.backbone.allowed_sha256
    return tuple(h for h in (get_spec(name).weights_sha256 for name in available()) if h)


def backbone_query(site: SiteConfig, content: Mapping[str, Any]) -> str:
    """Answer a server's backbone QUERY (status, or install the attached weights): '' when this site holds the
    pinned weights afterwards, else the reason it does not. A malformed message is a reason, never an exception."""
    config = content.get("config") if isinstance(content, Mapping) else None
    if not isinstance(config, Mapping):
        return "the query carries no `config` record"
    backbone, pinned, action = config.get("backbone"), config.get("sha256", ""), config.get("action", "backbone-status")
    if not isinstance(backbone, str) or not isinstance(pinned, str) or not (pinned == "" or _SHA256.fullmatch(pinned)):
        return f"the query needs `backbone` (a name) and `sha256` (64 hex digits); got {backbone!r}, {pinned!r}"
    try:
        if action == "backbone-install":
            install_backbone(site, backbone, pinned, content.get("weights"))
        elif action != "backbone-status":
            return f"unknown backbone action {action!r}; expected backbone-status or backbone-install"
        return check_pinned(backbone, pinned)
    except FedTLError as exc:
        log.warning("Site %s refuses the server's `%s` weights: %s", site.name, backbone, exc)
        return str(exc)
    except OSError as exc:  # the site's own weights folder: full disk, permissions
        log.error("Site %s cannot keep the `%s` weights: %s", site.name, backbone, exc)
        return f"this site cannot keep the `{backbone}` weights ({exc})"


def install_backbone(site: SiteConfig, backbone: str, pinned_sha256: str, payload: Any) -> Path:
    """Keep weights a server sent, in the site's state (atomically), after every check in the module notes.

    ``payload``: a 1-d uint8 array, or Flower's ``ArrayRecord`` holding one as ``file``. Returns the path; a file
    already there with the pinned hash is kept as it is.
    """
    spec = get_spec(backbone)
    allowed = allowed_weights_sha256(site)
    if pinned_sha256 not in allowed:
        listed = ", ".join(h[:16] + "…" for h in allowed) or "empty: this site accepts no weights from a server"
        raise BackboneError(
            f"The server offers `{backbone}` weights with sha256 {pinned_sha256[:16]}…, which is not on this site's "
            f"allow-list (`backbone.allowed-sha256` in {site.source}: {listed}); refusing them. Add the full hash "
            "there to accept them, or install the weights yourself.")
    if spec.weights_sha256 and pinned_sha256 != spec.weights_sha256:
        raise BackboneError(f"`{backbone}`'s published weights have sha256 {spec.weights_sha256[:16]}…, the server "
                            f"pinned {pinned_sha256[:16]}…; refusing them.")
    data = _payload_bytes(payload, site.backbone.max_weights_bytes, site.backbone.max_weights_mb, backbone)
    target_dir = site_weights_dir(site)
    target = target_dir / spec.weights_file
    if target.exists() or target.is_symlink():
        return _kept(target, pinned_sha256)
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned_sha256:
        raise BackboneError(
            f"Received weights for `{backbone}` have sha256 {digest[:16]}…, but the server pinned "
            f"{pinned_sha256[:16]}…; refusing them."
        )
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, target)  # unlike os.replace, fails if the file appeared meanwhile: never replaces
    except FileExistsError:
        return _kept(target, pinned_sha256)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("Installed %s weights (%d bytes, sha256 %s…) at %s", backbone, len(data), digest[:16], target)
    return target


def _kept(target: Path, pinned_sha256: str) -> Path:
    """A weights file the site already holds: kept if it is the pinned one, else the server is refused."""
    held = file_sha256(target) if target.is_file() else ""
    if held == pinned_sha256:
        log.info("Already holds %s (sha256 %s…); nothing written", target, held[:16])
        return target
    what = f"sha256 {held[:16]}…" if held else "not a regular file"
    raise BackboneError(f"This site already holds {target} ({what}); weights from a server never replace it. "
                        f"The server pinned {pinned_sha256[:16]}…: remove that file yourself to accept them.")


def _payload_bytes(payload: Any, max_bytes: int, max_mb: int, backbone: str) -> bytes:
    """The bytes of a 1-d uint8 payload, its size checked before it is deserialized."""
    array = payload.get("file") if isinstance(payload, Mapping) else payload
    if array is None:
        raise BackboneError(f"The install message for `{backbone}` carries no weights (`weights` record, `file`).")

    def too_big(size: int) -> BackboneError:
        return BackboneError(f"Received weights for `{backbone}` are {size / 1e6:.1f} MB, above this site's "
                             f"`backbone.max-weights-mb` = {max_mb}; refused before hashing.")

    if not isinstance(array, np.ndarray):  # Flower's Array: dtype, shape and serialized bytes
        shape, dtype = tuple(getattr(array, "shape", ()) or ()), str(getattr(array, "dtype", ""))
        if getattr(array, "stype", "") != "numpy.ndarray" or dtype != "uint8" or len(shape) != 1:
            raise BackboneError(f"Received weights for `{backbone}` must be a 1-d uint8 array, got {dtype or '?'} "
                                f"{shape} ({getattr(array, 'stype', type(array).__name__)}).")
        if shape[0] > max_bytes or len(getattr(array, "data", b"")) > max_bytes + _NPY_HEADER_SLACK:
            raise too_big(max(shape[0], len(getattr(array, "data", b""))))
        array = array.numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise BackboneError(f"Received weights for `{backbone}` must be a 1-d uint8 array, got {array.dtype} "
                            f"{array.shape}.")
    if array.nbytes > max_bytes:
        raise too_big(array.nbytes)
    return np.ascontiguousarray(array).tobytes()


def check_pinned(backbone: str, pinned_sha256: str) -> str:
    """'' when this site's weights match the pinned hash; else the reason to refuse."""
    local = local_backbone_sha256(backbone)
    if not local:
        return f"this site has no weights for `{backbone}`"
    if pinned_sha256 and local != pinned_sha256:
        return (f"this site's `{backbone}` weights have sha256 {local[:16]}…, the server pinned "
                f"{pinned_sha256[:16]}…: a different prefix, refusing to train")
    return ""
