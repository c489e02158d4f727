"""The plain (non-DP) local training loop against a hand-run torch reference; DP lives in test_privacy.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fedtl.config import AdaptersConfig, ModelConfig, TrainConfig
from fedtl.model import TransferModel
from fedtl.training import steps_per_epoch, train_suffix


def _model(tiny_backbone) -> TransferModel:
    return TransferModel(tiny_backbone, 2, ModelConfig(pooling="avg"), AdaptersConfig(kind="none", blocks=0))


def _data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 3 == 0).long()  # unbalanced: no gradient is zero up to rounding (Adam would amplify it)
    x = torch.randn(n, 16, generator=g)
    x[:, 0] += 2.0 * y - 1.0
    return x, y


def _reference(model: TransferModel, x, y, cfg: TrainConfig) -> tuple[dict, list[float]]:
    """Full-batch epochs (batch >= n, so the shuffle cannot matter) with the optimizer built by hand."""
    ref = copy.deepcopy(model)
    params = list(ref.suffix.head.parameters())
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    losses = []
    for _ in range(cfg.epochs):
        opt.zero_grad()
        loss = F.cross_entropy(ref.suffix(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return ref.trainable_state(), losses


@pytest.mark.parametrize("cfg", [
    TrainConfig(epochs=3, batch_size=64, lr=0.3, momentum=0.9, weight_decay=0.1),
    TrainConfig(epochs=3, batch_size=64, lr=0.3, momentum=0.0, weight_decay=0.0),
    TrainConfig(epochs=2, batch_size=64, lr=0.05, weight_decay=0.2, optimizer="adam"),
], ids=["sgd-momentum-decay", "sgd-plain", "adam-decay"])
def test_plain_training_is_the_configured_optimizer_on_the_suffix(tiny_backbone, cfg):
    model = _model(tiny_backbone)
    x, y = _data()
    expected, losses = _reference(model, x, y, cfg)
    result = train_suffix(model, x, y, cfg)
    for key, value in model.trainable_state().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    assert result.num_examples == 24 and result.steps == cfg.epochs and result.history == []
    assert result.loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert 0.0 < result.seconds < 30
    assert not model.training  # left in eval mode


def test_minibatches_are_shuffled_by_the_generator_and_reproducible_when_seeded(tiny_backbone):
    from fedtl.privacy.rng import seeded_generator

    x, y = _data(n=30)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.5, momentum=0.0)
    runs = {}
    for label, gen in (("r1", seeded_generator(0, "s", 1)), ("r1-again", seeded_generator(0, "s", 1)),
                       ("r2", seeded_generator(0, "s", 2)), ("os", None)):
        model = _model(tiny_backbone)
        result = train_suffix(model, x, y, cfg, generator=gen)
        runs[label] = (model.trainable_state(), result)
    assert runs["r1"][1].steps == 8 == steps_per_epoch(30, 4)
    assert all(torch.equal(runs["r1"][0][k], runs["r1-again"][0][k]) for k in runs["r1"][0])
    assert any(not torch.equal(runs["r1"][0][k], runs["r2"][0][k]) for k in runs["r1"][0])
    # Unshuffled batches would be the same in every round: the order comes from the generator.
    unshuffled = _model(tiny_backbone)
    opt = torch.optim.SGD(unshuffled.suffix.head.parameters(), lr=0.5)
    for i in range(0, 30, 4):
        opt.zero_grad()
        F.cross_entropy(unshuffled.suffix(x[i:i + 4]), y[i:i + 4]).backward()
        opt.step()
    assert not torch.allclose(unshuffled.trainable_state()["suffix.head.0.weight"], runs["r1"][0]["suffix.head.0.weight"])


def test_a_site_without_examples_is_refused_and_nothing_changes(tiny_backbone):
    model = _model(tiny_backbone)
    before = model.trainable_state()
    with pytest.raises(ValueError, match="no training examples"):
        train_suffix(model, torch.zeros(0, 16), torch.zeros(0, dtype=torch.int64), TrainConfig())
    assert all(torch.equal(before[k], v) for k, v in model.trainable_state().items())


@pytest.mark.parametrize("n,batch,steps", [(10, 4, 3), (8, 4, 2), (3, 64, 1), (1, 64, 1), (5, 1, 5), (0, 4, 1)])
def test_steps_per_epoch(n, batch, steps):
    assert steps_per_epoch(n, batch) == steps


def test_a_single_example_is_a_real_step_not_an_empty_batch(tiny_backbone):
    model = _model(tiny_backbone)
    x, y = _data(n=1)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.5, momentum=0.0)
    expected, losses = _reference(model, x, y, cfg)
    result = train_suffix(model, x, y, cfg)
    assert result.steps == 1 and result.loss == pytest.approx(losses[0])
    assert torch.allclose(model.trainable_state()["suffix.head.0.weight"], expected["suffix.head.0.weight"])
    assert model.trainable_state()["suffix.head.0.weight"].abs().sum() > 0
