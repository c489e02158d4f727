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
