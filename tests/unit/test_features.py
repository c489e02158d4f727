import dataclasses

import torch

from fedtl.config import AdaptersConfig, ModelConfig
from fedtl.data import ImageSet, Preprocessing
from fedtl.features import FeatureCache, cache_key, compute_prefix_features
from fedtl.model import TransferModel
from tests.conftest import make_tiny_backbone


def _setup(tiny_backbone, toy_images, blocks=1):
    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind="lora", blocks=blocks))
    pre = Preprocessing(resolution=12, mean=(0.5,) * 3, std=(0.25,) * 3)
    return model, pre, ImageSet(*toy_images, name="toy")


def test_cached_features_equal_live_ones_and_are_reused(tiny_backbone, toy_images, tmp_path):
    model, pre, data = _setup(tiny_backbone, toy_images)
    cache = FeatureCache(tmp_path)
    first, hit1 = cache.get_or_build(model, pre, data, progress=False)
    second, hit2 = cache.get_or_build(model, pre, data, progress=False)
    assert (hit1, hit2) == (False, True)
    live = model.prefix_features(pre(data.images))
    assert torch.allclose(second, live, atol=1e-6)
    assert len(list(tmp_path.iterdir())) == 1  # one entry, no temporary files left behind


def test_any_key_change_is_a_miss(tiny_backbone, toy_images, tmp_path):
    model, pre, data = _setup(tiny_backbone, toy_images)
    cache = FeatureCache(tmp_path)
    cache.get_or_build(model, pre, data, progress=False)
    base = cache_key(model, pre, data).digest()
    other_pre = dataclasses.replace(pre, resolution=16)
    other_data = ImageSet(data.images.copy(), data.labels.copy(), "toy")
    other_data.images[0, 0, 0] ^= 1
    other_split, _, _ = _setup(make_tiny_backbone(), toy_images, blocks=2)
    other_weights, _, _ = _setup(make_tiny_backbone(), toy_images)
    other_weights.weights_sha256 = "f" * 64
    keys = {cache_key(model, other_pre, data).digest(), cache_key(model, pre, other_data).digest(),
            cache_key(other_split, pre, data).digest(), cache_key(other_weights, pre, data).digest()}
    assert base not in keys and len(keys) == 4
    _, hit = cache.get_or_build(model, other_pre, data, progress=False)
    assert hit is False


def test_corrupt_entry_is_rebuilt_not_trusted(tiny_backbone, toy_images, tmp_path):
    model, pre, data = _setup(tiny_backbone, toy_images)
    cache = FeatureCache(tmp_path)
    cache.get_or_build(model, pre, data, progress=False)
    path = cache.path(cache_key(model, pre, data))
    path.write_bytes(b"garbage")
    feats, hit = cache.get_or_build(model, pre, data, progress=False)
    assert hit is False
    assert torch.allclose(feats, compute_prefix_features(model, pre, data), atol=1e-6)
    assert cache.load(cache_key(model, pre, data), len(data)) is not None  # rewritten whole


def test_shifted_views_translate_by_a_fourteenth_of_the_side_with_edges_repeated():
    import numpy as np

    from fedtl.features import VIEW_SHIFTS, shifted_view

    imgs = (np.arange(2 * 28 * 28).reshape(2, 28, 28) % 251).astype(np.uint8)
    data = ImageSet(imgs, np.array([0, 1]), "toy")
    assert shifted_view(data, 0) is data  # view 0: the image itself, the same cache entry
    assert VIEW_SHIFTS[1] == (1, 0) and VIEW_SHIFTS[3] == (-1, -1)
    down = shifted_view(data, 1).images  # content 2 px down (28 / 14), the top rows repeat the first row
    assert (down[:, 2:] == imgs[:, :-2]).all() and (down[:, 0] == imgs[:, 0]).all() and (down[:, 1] == imgs[:, 0]).all()
    up_left = shifted_view(data, 3).images
    assert (up_left[:, :-2, :-2] == imgs[:, 2:, 2:]).all() and (up_left[:, -1, :-2] == imgs[:, -1, 2:]).all()
    rgb = ImageSet(np.repeat(imgs[..., None], 3, -1), np.array([0, 1]), "rgb")
    big = ImageSet(np.zeros((1, 224, 224), np.uint8), np.array([0]), "big")
    assert shifted_view(rgb, 2).images.shape == (2, 28, 28, 3)
    assert (shifted_view(rgb, 2).images[:, :, 2:, 0] == imgs[:, :, :-2]).all()  # right by 2, every channel alike
    big_img = big.images.copy()
    big_img[0, 100, 100] = 255
    moved = shifted_view(ImageSet(big_img, big.labels, "big"), 1).images
    assert moved[0, 116, 100] == 255  # 224 / 14 = 16 px
    assert len({shifted_view(data, k).fingerprint for k in range(len(VIEW_SHIFTS))}) == len(VIEW_SHIFTS)
    other = ImageSet(imgs[::-1].copy(), np.array([0, 1]), "toy")  # same pixels' multiset, other order: other data
    assert shifted_view(other, 1).fingerprint != shifted_view(data, 1).fingerprint


def test_a_cached_view_is_found_without_shifting_or_hashing_its_pixels(tiny_backbone, toy_images, tmp_path):
    from fedtl.features import shifted_view

    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig())
    pre = Preprocessing(resolution=12, mean=(0.5,) * 3, std=(0.25,) * 3)
    data = ImageSet(*toy_images, name="toy")
    cache = FeatureCache(tmp_path)
    built, hit = cache.get_or_build(model, pre, shifted_view(data, 2), progress=False)
    assert not hit
    again = shifted_view(ImageSet(*toy_images, name="toy"), 2)
    feats, hit = cache.get_or_build(model, pre, again, progress=False)
    assert hit and torch.equal(feats, built)
    assert "images" not in again.__dict__  # a hit never made the shifted copy


def test_view_features_stack_every_view_and_hit_only_when_all_were_cached(tiny_backbone, toy_images, tmp_path):
    from fedtl.config import AdaptersConfig, ModelConfig
    from fedtl.features import view_features

    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig())
    pre = Preprocessing(resolution=12, mean=(0.5,) * 3, std=(0.25,) * 3)
    data = ImageSet(*toy_images, name="toy")
    cache = FeatureCache(tmp_path)
    one, _ = view_features(lambda d: cache.get_or_build(model, pre, d, progress=False), data, 1)
    assert one.ndim == 2  # one view: the plain features, the entry every other path uses
    three, hit = view_features(lambda d: cache.get_or_build(model, pre, d, progress=False), data, 3)
    assert three.shape == (len(data), 3, one.shape[1]) and hit is False  # views 1 and 2 were built
    assert torch.equal(three[:, 0], one) and not torch.equal(three[:, 1], one)
    again, hit = view_features(lambda d: cache.get_or_build(model, pre, d, progress=False), data, 3)
    assert hit is True and torch.equal(again, three) and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_the_log_names_which_test_time_view_it_is_computing(tiny_backbone, toy_images, tmp_path, caplog):
    """A new user saw "Computing prefix features for …:val (524 images)…" four times and could not tell why."""
    import logging

    model, pre, data = _setup(tiny_backbone, toy_images)
    with caplog.at_level(logging.INFO, logger="fedtl.features"):
        for view in (0, 2):
            compute_prefix_features(model, dataclasses.replace(pre, view=view), data, progress=True)
    lines = [r.getMessage() for r in caplog.records if "Computing prefix features" in r.getMessage()]
    assert lines == ["Computing prefix features for toy (64 images)…",
                     "Computing prefix features for toy (test-time view 2) (64 images)…"]
