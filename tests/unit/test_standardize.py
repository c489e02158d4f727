"""Richer pooling (``model.pooling``) and training the head in standardized coordinates (``train.standardize``)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fedtl.config import FedTLConfig, ModelConfig, TrainConfig
from fedtl.errors import UpdateRejected
from fedtl.features import split_key
from fedtl.model import SpatialPool, SuffixModel, TransferModel
from fedtl.privacy import rng
from fedtl.standardize import MAX_FEATURES, FeatureStandardizer, first_linear, server_standardizer
from fedtl.training import DPSettings, train_suffix


def _head(dim=6, classes=2, seed=0) -> SuffixModel:
    torch.manual_seed(seed)
    model = SuffixModel("b", "0" * 64, "unit", dim, classes, ModelConfig(pooling="avg"))
    with torch.no_grad():
        for p in model.suffix.head.parameters():
            p.normal_(0, 0.5)
    return model


def _stats(dim=6, seed=1) -> FeatureStandardizer:
    g = torch.Generator().manual_seed(seed)
    reference = 5 + 3 * torch.randn(50, dim, generator=g) * torch.linspace(0.1, 4, dim)
    return FeatureStandardizer.from_reference(reference, gain=0.3)


# ---- pooling -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [7, 8, 1])
def test_pooled_features_are_the_mean_the_std_and_the_quadrant_means(side):
    maps = torch.randn(3, 5, side, side)
    out = SpatialPool("avg-std-grid")(maps)
    assert out.shape == (3, 30) and SpatialPool("avg-std")(maps).shape == (3, 10) and SpatialPool("avg")(maps).shape == (3, 5)
    assert torch.allclose(out[:, :5], maps.mean((2, 3)), atol=1e-6)
    assert torch.allclose(out[:, 5:10], maps.std((2, 3), unbiased=False), atol=1e-3)
    quadrants = torch.nn.functional.adaptive_avg_pool2d(maps, 2)  # (3, 5, 2, 2): row-major quadrants
    assert torch.allclose(out[:, 10:], torch.cat([quadrants[:, :, i, j] for i in (0, 1) for j in (0, 1)], 1), atol=1e-6)


def test_the_std_of_a_flat_map_has_a_finite_gradient():
    maps = torch.ones(2, 3, 4, 4, requires_grad=True)
    SpatialPool("avg-std").forward(maps).sum().backward()
    assert torch.isfinite(maps.grad).all()


def test_each_pooling_has_its_own_cache_entries_and_the_mean_keeps_the_old_key():
    assert split_key("block4_2", "avg") == "block4_2:pooled"  # entries made before poolings were selectable
    keys = {split_key("block4_2", p) for p in ("avg", "avg-std", "avg-std-grid")} | {split_key("block4_2", None)}
    assert len(keys) == 4


# ---- standardized coordinates ------------------------------------------------------------------------------

def test_rewriting_the_head_keeps_its_function_and_going_back_restores_it():
    model, stats = _head(), _stats()
    x = 5 + 3 * torch.randn(20, 6)
    before = model.suffix(x)
    weights = {k: v.clone() for k, v in model.trainable_state().items()}
    with stats.training_coordinates(model):  # the head is rewritten and reads standardized input: same function
        assert not torch.allclose(model.suffix.head[0].weight, weights["suffix.head.0.weight"], atol=1e-3)
        assert torch.allclose(model.suffix(x), before, atol=1e-4)
    assert torch.allclose(model.suffix(x), before, atol=1e-5)
    assert not model.suffix.head[0]._forward_pre_hooks  # the standardizing hook is gone
    for k, v in model.trainable_state().items():
        assert torch.allclose(v, weights[k], atol=1e-6), k


def test_standardized_dp_training_is_dp_training_of_a_head_on_standardized_features():
    """The site's update equals training, under DP-SGD (clipping in standardized coordinates), a head that reads
    standardized features, mapped back to raw coordinates: what is sent is an ordinary head on raw features."""
    stats = _stats()
    x, y = 5 + 3 * torch.randn(40, 6) * torch.linspace(0.1, 4, 6), torch.randint(0, 2, (40,))
    cfg, dp = TrainConfig(lr=0.5, batch_size=8, epochs=2), DPSettings(0.7, 0.3, 8 / 40)

    ours = _head()
    train_suffix(ours, x, y, cfg, dp=dp, generator=rng.seeded_generator(0, "s", "r", 1), reseed=False,
                 standardize=stats)
    reference = _head()
    with stats.training_coordinates(reference):  # the same start, written in standardized coordinates
        pass
    w0, b0 = (p.detach().double() for p in reference.suffix.head[0].parameters())
    with torch.no_grad():  # hand the reference head the standardized-coordinate weights, train it on u directly
        reference.suffix.head[0].weight.copy_(w0 * stats.scale)
        reference.suffix.head[0].bias.copy_(b0 + w0 @ stats.mean)
    train_suffix(reference, stats.transform(x), y, cfg, dp=dp, generator=rng.seeded_generator(0, "s", "r", 1),
                 reseed=False)
    assert torch.allclose(ours.suffix(x), reference.suffix(stats.transform(x)), atol=1e-3)
    assert not torch.allclose(ours.suffix(x), _head().suffix(x), atol=1e-3)  # it trained


def test_statistics_floor_constant_dimensions_and_round_trip_through_a_request():
    ref = torch.randn(30, 4)
    ref[:, 2] = 7.0  # constant: its std would be 0
    stats = FeatureStandardizer.from_reference(ref, gain=0.5)
    assert bool((stats.scale > 0).all()) and torch.isfinite(stats.transform(ref)).all()
    again = FeatureStandardizer.from_config(json.loads(json.dumps(stats.to_config())))
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.scale, stats.scale)
    assert FeatureStandardizer.from_config({"server-round": 1}) is None  # a server that sends none


@pytest.mark.parametrize("config,match", [
    ({"feature-mean": [0.0, 1.0]}, "sent together"),
    ({"feature-mean": [0.0], "feature-scale": [1.0, 1.0]}, "has 1 values"),
    ({"feature-mean": [0.0, float("nan")], "feature-scale": [1.0, 1.0]}, "finite"),
    ({"feature-mean": [0.0, 0.0], "feature-scale": [1.0, float("inf")]}, "finite"),
    ({"feature-mean": [0.0, 0.0], "feature-scale": [1.0, 0.0]}, "feature-scale"),
    ({"feature-mean": [0.0, 0.0], "feature-scale": [1.0, -2.0]}, r"in \[1e-06, 1e\+06\]"),
    ({"feature-mean": [0.0, 0.0], "feature-scale": [1.0, 1e-300]}, r"in \[1e-06, 1e\+06\]"),
    ({"feature-mean": [0.0, 0.0], "feature-scale": [1.0, 1e7]}, r"in \[1e-06, 1e\+06\]"),
    ({"feature-mean": [0.0, -1e7], "feature-scale": [1.0, 1.0]}, "feature-mean"),
    ({"feature-mean": [True, 0.0], "feature-scale": [1.0, 1.0]}, "finite numbers"),
    ({"feature-mean": ["0", 0.0], "feature-scale": [1.0, 1.0]}, "finite numbers"),
    ({"feature-mean": 0.0, "feature-scale": 1.0}, "list"),
    ({"feature-mean": [], "feature-scale": []}, "list"),
    ({"feature-mean": [0.0] * (MAX_FEATURES + 1), "feature-scale": [1.0] * (MAX_FEATURES + 1)}, "list"),
])
def test_a_servers_malformed_statistics_are_refused_naming_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        FeatureStandardizer.from_config(config)


def test_statistics_that_do_not_fit_the_head_never_touch_it():
    model = _head(dim=6)
    with torch.no_grad():
        model.suffix.head[0].weight[0, 0] = 3e38  # a server's suffix that overflows once rescaled
    before = model.trainable_state()
    huge = FeatureStandardizer(torch.zeros(6, dtype=torch.float64), torch.full((6,), 1e6, dtype=torch.float64))
    for stats, match in ((_stats(dim=5), "5 dimensions, the head takes 6"), (huge, "does not stay finite")):
        assert match in stats.problem(model)
        with pytest.raises(ValueError, match=match):
            with stats.training_coordinates(model):
                pass
    assert all(torch.equal(v, before[k]) for k, v in model.trainable_state().items())


def test_the_server_sends_statistics_unless_the_run_trains_raw_or_with_layernorm():
    val = torch.randn(10, 4, 6)  # (N, views, D): the first view is the image itself
    stats = server_standardizer(FedTLConfig(), val)
    assert stats is not None and torch.allclose(stats.mean, val[:, 0].double().mean(0))
    for overrides in ({"train.standardize": "none"}, {"model.feature-norm": "layernorm"}):
        assert server_standardizer(FedTLConfig().with_overrides(overrides), val) is None, overrides
    assert server_standardizer(FedTLConfig(), None) is None and server_standardizer(FedTLConfig(), val[:1]) is None


def test_with_adapters_the_statistics_are_those_of_what_the_head_reads(tiny_backbone):
    """Adapters: the server's validation features are feature maps; the statistics are taken on the pooled output of
    the suffix's blocks as it starts (LoRA starts as the identity), the input of the head's first linear layer."""
    cfg = FedTLConfig().with_overrides({"adapters.kind": "lora", "adapters.blocks": 1, "model.pooling": "avg-std"})
    model = TransferModel(tiny_backbone, 2, cfg.model, cfg.adapters)
    maps = model.prefix_features(torch.randn(12, 3, 12, 12))
    assert maps.ndim == 4
    with pytest.raises(ValueError, match="model whose suffix pools them"):
        server_standardizer(cfg, maps)
    stats = server_standardizer(cfg, maps, model)
    read = []  # what the head's first linear layer receives in the model's own forward pass
    hook = first_linear(model).register_forward_hook(lambda m, a, out: read.append(a[0].detach().double()))
    with torch.no_grad():
        model.suffix(maps)
    hook.remove()
    assert stats.dim == first_linear(model).in_features == read[0].shape[1]
    assert torch.allclose(stats.mean, read[0].mean(0), atol=1e-5)


def test_a_lora_suffix_trains_its_adapters_and_head_in_standardized_coordinates_and_returns_raw(tiny_backbone):
    """DP training of a LoRA suffix with the server's statistics: the adapters and the head move, the head comes back
    in raw coordinates (the model is the one the standardized training computed), and no hook is left behind."""
    cfg = FedTLConfig().with_overrides({"adapters.kind": "lora", "adapters.blocks": 1, "model.pooling": "avg-std"})
    model = TransferModel(tiny_backbone, 2, cfg.model, cfg.adapters)
    g = torch.Generator().manual_seed(0)
    maps = model.prefix_features(torch.randn(40, 3, 12, 12, generator=g))
    y = torch.randint(0, 2, (40,), generator=g)
    stats = server_standardizer(cfg, maps, model)
    start = {k: v.clone() for k, v in model.trainable_state().items()}
    with torch.no_grad():
        start_pooled = model.suffix.pool(model.suffix.blocks(maps))
    seen = []
    hook = first_linear(model).register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))  # input as read
    train_suffix(model, maps, y, TrainConfig(lr=0.5, batch_size=8, epochs=1), dp=DPSettings(0.5, 1.0, 8 / 40),
                 generator=rng.seeded_generator(0, "s", "r", 1), reseed=False, standardize=stats)
    hook.remove()
    moved = [k for k, v in model.trainable_state().items() if not torch.equal(v, start[k])]
    assert any("lora" in k for k in moved) and any("head" in k for k in moved), moved
    first = seen[0]  # the first batch, read before any step: the standardized pooled features of its examples
    assert first.shape[0] > 0
    standardized = stats.transform(start_pooled)
    assert float(torch.cdist(first, standardized).min(1).values.max()) < 1e-2  # (raw: about 1.3 away)
    assert not first_linear(model)._forward_pre_hooks
    assert torch.isfinite(model.suffix(maps)).all()


# ---- runs made before model.pooling existed ------------------------------------------------------------------

def test_a_run_made_before_poolings_were_selectable_still_loads_with_mean_pooling(tmp_path, monkeypatch, tiny_backbone):
    import fedtl.backbones
    from fedtl.inference import load_run

    monkeypatch.setattr(fedtl.backbones, "build_backbone", lambda name: tiny_backbone)
    old = FedTLConfig().to_run_config()
    del old["model.pooling"], old["train.standardize"], old["train.standardize-gain"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    head = {"suffix.head.0.weight": torch.randn(2, 16), "suffix.head.0.bias": torch.zeros(2)}  # 16 = the mean's width
    save_file(head, tmp_path / "suffix.safetensors", metadata={"backbone": "efficientnet_lite0",
                                                              "weights_sha256": tiny_backbone.weights_sha256})
    run = load_run(tmp_path)
    assert run.config.model.pooling == "avg" and run.model.suffix.head[0].in_features == 16
    resolved = FedTLConfig().resolved(has_reference=True)  # what a server with validation data writes
    (tmp_path / "config.json").write_text(json.dumps(resolved.to_run_config()))
    with pytest.raises(UpdateRejected, match=r"expected \(2, 96\)"):
        load_run(tmp_path)
