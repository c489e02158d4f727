import pytest
import torch

from fedtl.config import AdaptersConfig, ModelConfig, TrainConfig
from fedtl.errors import ConfigError, UpdateRejected
from fedtl.model import TransferModel
from fedtl.training import DPSettings, train_suffix


def _frozen_snapshot(model: TransferModel) -> dict:
    trainable = set(model.trainable_names())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if k not in trainable}


@pytest.mark.parametrize("kind,blocks", [("none", 0), ("lora", 2), ("unfreeze", 1)])
@pytest.mark.parametrize("dp", [False, True])
def test_only_suffix_tensors_change_prefix_and_bn_stats_bit_identical(tiny_backbone, tmp_path, kind, blocks, dp):
    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind=kind, blocks=blocks, rank=2))
    before_frozen = _frozen_snapshot(model)
    before_train = model.trainable_state()
    x = torch.randn(40, 3, 12, 12)
    feats = model.prefix_features(x)
    labels = torch.randint(0, 2, (40,))
    dp_settings = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=8 / 40) if dp else None
    train_suffix(model, feats, labels, TrainConfig(lr=0.5, batch_size=8, epochs=2), dp=dp_settings)
    after = model.state_dict()
    for key, value in before_frozen.items():  # prefix weights, frozen suffix weights, BN running stats
        assert torch.equal(after[key], value), key
    changed = [k for k, v in model.trainable_state().items() if not torch.equal(v, before_train[k])]
    assert changed, "training changed nothing"
    assert all(k.startswith("suffix.") for k in model.trainable_names())


def test_prefix_plus_suffix_reproduces_the_backbone(tiny_backbone):
    model = TransferModel(tiny_backbone, 2, ModelConfig(pooling="avg"), AdaptersConfig(kind="lora", blocks=2))
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        reference = torch.nn.functional.adaptive_avg_pool2d(tiny_backbone.features()(x), 1).flatten(1)
        ours = model.suffix.pool(model.suffix.blocks(model.prefix_features(x)))
    assert torch.allclose(ours, reference, atol=1e-6)  # LoRA starts at zero: the pretrained function


def test_suffix_train_mode_keeps_batchnorm_in_eval(tiny_backbone):
    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind="unfreeze", blocks=2)).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.suffix.head.training


def test_load_trainable_state_rejects_wrong_shapes_and_nan(tiny_backbone):
    model = TransferModel(tiny_backbone, 2, ModelConfig(pooling="avg"), AdaptersConfig(kind="none", blocks=0))
    state = model.trainable_state()
    bad = dict(state, **{"suffix.head.0.weight": torch.zeros(3, 16)})
    with pytest.raises(UpdateRejected, match=r"`suffix.head.0.weight` has shape \(3, 16\), expected \(2, 16\)"):
        model.load_trainable_state(bad)
    nan = dict(state, **{"suffix.head.0.bias": torch.tensor([float("nan"), 0.0])})
    with pytest.raises(UpdateRejected, match="NaN"):
        model.load_trainable_state(nan)
    before = model.trainable_state()
    assert all(torch.equal(before[k], v) for k, v in state.items())  # nothing half-loaded


def test_split_beyond_the_backbone_is_a_config_error(tiny_backbone):
    with pytest.raises(ConfigError, match="adapters.blocks"):
        TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind="lora", blocks=4))


@pytest.mark.slow
def test_real_backbone_lora_suffix_leaves_prefix_untouched(tmp_path):
    from fedtl.backbones import build_backbone

    model = TransferModel(build_backbone("efficientnet_lite0"), 2, ModelConfig(cut_after=""), AdaptersConfig(kind="lora", blocks=2))
    frozen = _frozen_snapshot(model)
    feats = model.prefix_features(torch.randn(16, 3, 64, 64))
    train_suffix(model, feats, torch.randint(0, 2, (16,)), TrainConfig(lr=0.1, batch_size=8),
                 dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert model.param_counts()["trainable_params"] < 0.01 * model.param_counts()["total_params"]


def test_cut_after_truncates_and_infers_the_feature_width(tiny_backbone):
    model = TransferModel(tiny_backbone, 2, ModelConfig(cut_after="b2", pooling="avg"), AdaptersConfig(kind="none", blocks=0))
    assert model.cut_after == "b2" and model.suffix.head[-1].in_features == 12
    assert model.prefix_features(torch.randn(2, 3, 12, 12)).shape == (2, 12)
    with pytest.raises(ConfigError, match=r"`model.cut-after` must name a unit of tiny .* got 'b9'. Units: stem, b1, b2, head_conv"):
        TransferModel(tiny_backbone, 2, ModelConfig(cut_after="b9"), AdaptersConfig(kind="none", blocks=0))


def test_unfrozen_blocks_train_at_a_lower_learning_rate_by_default(tiny_backbone):
    from fedtl.config import AdaptersConfig

    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind="unfreeze", blocks=1))
    scale = AdaptersConfig(kind="unfreeze", blocks=1).effective_lr_scale()
    groups = model.trainable_param_groups(0.5, scale)
    assert [g["lr"] for g in groups] == [0.5, 0.05]
    assert AdaptersConfig(kind="lora", blocks=1).effective_lr_scale() == 1.0


def test_a_suffix_given_views_predicts_their_mean_and_each_example_is_clipped_as_one():
    """train.views: (B, K, D) features → log of the mean probability over an example's K views. Opacus' per-example
    gradient of an example depends on its own views only, so one example is still one clipped gradient."""
    import torch
    from opacus import GradSampleModule

    from fedtl.config import ModelConfig
    from fedtl.model import Suffix

    torch.manual_seed(0)
    suffix = Suffix(torch.nn.Sequential(), 6, 3, ModelConfig())
    torch.nn.init.normal_(suffix.head[-1].weight)
    z = torch.randn(4, 5, 6)
    expected = torch.log(torch.softmax(suffix.head(z), -1).mean(1))
    assert torch.allclose(suffix(z), expected, atol=1e-6)
    assert torch.allclose(suffix(z[:, 0]), suffix.head(z[:, 0]))  # one view: the plain head

    def per_example(feats):
        gsm = GradSampleModule(Suffix(torch.nn.Sequential(), 6, 3, ModelConfig()))
        gsm._module.head.load_state_dict(suffix.head.state_dict())
        torch.nn.functional.cross_entropy(gsm(feats), torch.tensor([0, 1, 2, 0])).backward()
        grads = torch.cat([p.grad_sample.flatten(1) for p in gsm.parameters() if p.requires_grad], 1)
        gsm._close()
        return grads

    base = per_example(z)
    changed = z.clone()
    changed[0] += 3.0  # every view of example 0
    after = per_example(changed)
    assert base.shape[0] == 4 and not torch.allclose(after[0], base[0])
    assert torch.allclose(after[1:], base[1:], atol=1e-6)
