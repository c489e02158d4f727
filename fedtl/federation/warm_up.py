"""A deployed site's feature cache, built before the first round that needs it.

A site's first round builds its feature cache: by default four prefix passes over every training image, and the
test-time views of the images it evaluates on. On 2 CPU cores that is about 210 s for 5,000 images at 112 px (and
some 16 minutes at 224 px), which can outlast the server's ``federation.round-timeout``. The site worker
(``fedtl.federation.worker``) therefore builds these entries as soon as it starts, one view at a time, and stops
between views when a request is waiting (the request then builds what is left, as before). It warms the cache for
the settings of the last train request the site served (kept in ``<state-dir>/features/warm-up.json``), or for the
default run's. A train request that still finds the site unprepared too late declines without spending privacy
(``fedtl.federation.handlers.late_reason``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedtl.config import FedTLConfig
from fedtl.errors import FedTLError
from fedtl.features import FeatureCache
from fedtl.files import write_atomically
from fedtl.federation.deployment import (_evaluation_images, _site_images, cut_point, feature_key, head_only_weights,
                                         load_site_config)
from fedtl.federation.site import preprocessing_for
from fedtl.federation.site_split import held_out_rows, stored_split
from fedtl.model import TransferModel
from fedtl.site_config import SiteConfig

log = logging.getLogger(__name__)

WARM_UP_FILE = "warm-up.json"  # under <state-dir>/features: the feature settings of the last train request served
FEATURE_KEYS = ("model.backbone", "model.resolution", "model.cut-after", "model.pooling", "adapters.kind",
                "train.views", "evaluation.views")


def remember_feature_settings(cfg: FedTLConfig, site_config_path: str) -> None:
    """Keep the settings that decide this run's prefix features (:data:`FEATURE_KEYS`), so that a restarted site warms
    its cache for the run it serves (:func:`warm_up_steps`). Written only when they change; best effort."""
    site = load_site_config(site_config_path)
    path = Path(site.state_dir) / "features" / WARM_UP_FILE
    flat = cfg.to_run_config()
    wanted = {k: flat[k] for k in FEATURE_KEYS}
    try:
        if json.loads(path.read_text()) == wanted:
            return
    except (OSError, ValueError):
        pass
    try:
        write_atomically(path, json.dumps(wanted).encode())
    except OSError as exc:
        log.warning("Site %s: could not record the run's feature settings in %s: %s", site.name, path, exc)


def feature_settings(site: SiteConfig) -> FedTLConfig:
    """The config to warm the cache for: the last train request's feature settings at this site, else the default
    run's (its pooling as a server with validation data resolves it). A file that is unreadable or that this
    version does not accept is ignored (logged): warming up is an optimization, never a reason to stop."""
    path = Path(site.state_dir) / "features" / WARM_UP_FILE
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict) or set(stored) - set(FEATURE_KEYS):
            raise ValueError(f"expected the keys {', '.join(FEATURE_KEYS)}")
        return FedTLConfig.from_run_config(stored)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, FedTLError) as exc:
        log.warning("Site %s: ignoring %s (%s); warming up for the default run.", site.name, path, exc)
    return FedTLConfig().resolved(has_reference=True)


def awaiting_weights(site_config_path: str) -> bool:
    """Whether the warm-up has nothing to build only because the backbone's weights are not at this site yet (the
    server sends them before round 1): the head-only suffix with a named cut, and no local copy of the weights."""
    cfg = feature_settings(load_site_config(site_config_path))
    return cfg.adapters.kind == "none" and bool(cut_point(cfg)) and not head_only_weights(cfg)


def warm_up_steps(site_config_path: str, cfg: FedTLConfig | None = None) -> list[tuple[str, Any]]:
    """The prefix passes a train and an evaluate request of ``cfg`` (default: :func:`feature_settings`) will need at
    this site, one ``(description, build)`` per view: the training views of its images, then the test-time views of
    the images it evaluates on. Each build stores its entry in the site's feature cache (nothing when it is there),
    so a caller can stop between them. Empty when nothing can be cached ahead (:func:`deployment.head_only_weights`:
    adapters in the suffix, the whole network as prefix, or no copy of the backbone's weights at the site yet — the
    server sends them before round 1, which then builds the cache)."""
    site = load_site_config(site_config_path)
    cfg = cfg or feature_settings(site)
    if not head_only_weights(cfg):
        return []
    from fedtl.features import shifted_view
    from fedtl.federation.site import build_transfer_model

    cache = FeatureCache(Path(site.state_dir) / "features")
    pre = preprocessing_for(cfg)
    built: list[TransferModel] = []

    def model() -> TransferModel:  # built by the first step that needs it, once
        if not built:
            built.append(build_transfer_model(cfg, 2))  # the prefix's features do not depend on the classes
        return built[0]

    images = _site_images(site_config_path).images
    steps = [(f"training view {k + 1}/{cfg.train_views} of {len(images)} images",
              lambda k=k: cache.get_or_build(model(), pre, shifted_view(images, k), progress=False))
             for k in range(cfg.train_views)]
    if site.evaluation.enabled:
        held, _ = _evaluation_images(site, site_config_path)
        steps += [(f"test-time view {k + 1}/{cfg.eval_views} of {len(held)} evaluation images",
                   lambda k=k: cache.get_or_build(model(), replace(pre, view=k), held, progress=False))
                  for k in range(cfg.eval_views)]
    return steps


def cache_status(site: SiteConfig, images, eval_images=None) -> str:
    """One line for ``fedtl site check``: how many of the entries the site's next round reads (:func:`warm_up_steps`'
    list, for :func:`feature_settings`) are in its feature cache. Reads file names only and writes nothing: the
    held-out images are those of the stored evaluation split, or, before there is one, counted as not built.
    ``images``: the site's images; ``eval_images``: its separate evaluation images, when it has them."""
    import numpy as np

    from fedtl.features import shifted_view

    cfg = feature_settings(site)
    settings = "the last run's settings" if (Path(site.state_dir) / "features" / WARM_UP_FILE).is_file() \
        else "the default run's settings"
    if cfg.adapters.kind != "none":
        return f"feature cache: not used ({settings}: adapters in the suffix; every round runs the backbone)"
    sha = head_only_weights(cfg)
    if not sha and not cut_point(cfg):
        return f"feature cache: not checked ({settings}: the whole network as prefix; the first round builds it)"
    if not sha:
        return ("feature cache: unknown until the backbone's weights are at the site (the server sends them before "
                "round 1; `fedtl-site start` builds the cache as soon as they arrive, else the first round does)")
    cache = FeatureCache(Path(site.state_dir) / "features")
    pre = preprocessing_for(cfg)

    def built(data, view_pre) -> bool:
        return cache.path(feature_key(cfg, sha, view_pre, data)).is_file()

    have = sum(built(shifted_view(images, k), pre) for k in range(cfg.train_views))
    parts = [f"training views {have} of {cfg.train_views} ({len(images)} images)"]
    wanted = cfg.train_views
    if site.evaluation.enabled:
        held = eval_images
        if held is None:
            split, _ = stored_split(site, images)
            held = None if split is None else images.subset(np.asarray(held_out_rows(split), dtype=np.int64))
        done = 0 if held is None else sum(built(held, replace(pre, view=k)) for k in range(cfg.eval_views))
        parts.append(f"test-time views {done} of {cfg.eval_views}")
        have, wanted = have + done, wanted + cfg.eval_views
    verdict = ("the first round reads them" if have == wanted else
               "`fedtl-site start` builds the rest before the first round (the site worker), else the first round does")
    return f"feature cache for {settings} ({cfg.model.resolution} px, {cfg.model.pooling}): {', '.join(parts)}; {verdict}"
