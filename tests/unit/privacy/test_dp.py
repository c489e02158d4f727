"""DP-SGD mechanics, accounting against independent references, and secret randomness."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.config import TrainConfig
from fedtl.privacy import calibrate_noise, epsilon_of
from fedtl.privacy import rng
from fedtl.privacy.engine import make_private, unwrap
from fedtl.training import DPSettings, train_suffix


def _one_step(dp: bool, noise: float, clip: float, scale: float = 1.0, lr: float = 0.1):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(16, 6) * scale, torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    before = [p.detach().clone() for p in net.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = net
    if dp:
        module, opt, loader, _ = make_private(net, opt, loader, noise_multiplier=noise, max_grad_norm=clip,
                                              accountant="rdp", history=[])
    opt.zero_grad()
    with warnings.catch_warnings():  # Opacus hooks on inputs that need no grad: torch notes it
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(module(x), y).backward()  # the full batch: expected batch size 16
    opt.step()
    unwrap(module)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])


def test_dp_with_zero_noise_and_huge_clip_equals_plain_sgd():
    assert torch.allclose(_one_step(True, 0.0, 1e6), _one_step(False, 0.0, 0.0), atol=1e-6)


def test_clipping_bounds_each_sample_contribution():
    clip, lr = 0.01, 0.1
    delta = _one_step(True, 0.0, clip, scale=1000.0, lr=lr)
    assert 0 < delta.norm() <= lr * clip * (1 + 1e-4)  # mean of 16 clipped grads, each of norm <= C
    assert _one_step(False, 0.0, 0.0, scale=1000.0, lr=lr).norm() > 100 * lr * clip


# ---- accounting against references that do not share Opacus' RDP code -----------------------
def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact ε of the Gaussian mechanism (sensitivity 1, noise σ) at δ: Balle & Wang (ICML 2018),
    Theorem 8: δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ)."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma) - delta

    return optimize.brentq(gap, 1e-9, 100.0)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 4), (4.0, 25)])
def test_full_batch_composition_against_the_exact_gaussian_mechanism(sigma, steps):
    # q = 1: k Gaussian steps at σ compose exactly into one Gaussian at σ/√k.
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(steps), 1e-5)
    rdp = epsilon_of([(sigma, 1.0, steps)], 1e-5, "rdp")
    prv = epsilon_of([(sigma, 1.0, steps)], 1e-5, "prv")
    assert rdp >= exact  # RDP is an upper bound, never below the truth
    assert rdp <= 1.6 * exact  # …and not a vacuous one
    assert prv == pytest.approx(exact, rel=0.03, abs=0.02)  # PRV is near-exact


def test_subsampled_rdp_is_an_upper_bound_of_prv():
    history = [(0.9, 0.02, 120), (1.3, 0.1, 7), (0.9, 0.02, 5)]
    rdp, prv = epsilon_of(history, 1e-5, "rdp"), epsilon_of(history, 1e-5, "prv")
    assert prv <= rdp <= 1.5 * prv


@pytest.mark.parametrize("sigma,epochs,published", [(1.1, 60, 3.01), (0.7, 45, 7.10)])
def test_published_dp_sgd_mnist_figures(sigma, epochs, published):
    # TF-Privacy's MNIST tutorial table (tutorials/README.md): batch 256 of 60,000, δ=1e-5, ε=3.01 at σ=1.1 for 60
    # epochs and ε=7.10 at σ=0.7 for 45, from the classic RDP→(ε,δ) conversion. Opacus converts with the tighter
    # bound of Balle et al. (2020): never above the published figure, and not far below it.
    q = 256 / 60000
    steps = int(epochs * 60000 / 256)
    eps = epsilon_of([(sigma, q, steps)], 1e-5, "rdp")
    assert 0.8 * published <= eps <= published


def test_calibrated_noise_meets_the_budget_and_is_minimal():
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 400)
    assert epsilon_of([(sigma, 0.05, 400)], 1e-5) <= 3.0
    assert epsilon_of([(sigma - 0.05, 0.05, 400)], 1e-5) > 3.0  # any less noise would exceed it


@pytest.mark.parametrize("target, q, steps", [(3.0, 0.14, 280), (3.0, 0.6, 80), (0.75, 0.6, 2), (8.0, 0.5, 80),
                                              (3.0, 1.0, 40), (3.0, 0.01, 1)])
def test_calibration_is_tight_on_opacus_full_order_grid(target, q, steps):
    # The search brackets σ on the integer orders (an upper bound of ε), then refines on all of Opacus' orders:
    # the result must meet the budget on Opacus' own accountant and be within the tolerance of it.
    from opacus.accountants import RDPAccountant

    from fedtl.privacy.accounting import _rdp_epsilon

    sigma = calibrate_noise(target, 1e-5, q, steps)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(delta=1e-5)
    assert target - 0.01 <= eps <= target
    assert _rdp_epsilon([(sigma, q, steps)], 1e-5, integer_orders=True) >= eps  # fewer orders: never a lower ε


def test_gdp_is_not_an_accountant():
    with pytest.raises(ValueError, match="rdp, prv"):
        epsilon_of([(1.0, 0.1, 10)], 1e-5, "gdp")


# ---- the noise actually added ---------------------------------------------------------------------
class _ZeroGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(50, 4)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("reseed", [True, False])
def test_noise_in_a_dp_step_has_std_sigma_times_clip(reseed):
    sigma, clip, batch, steps = 1.7, 0.5, 32, 300
    torch.manual_seed(0)
    net = _ZeroGrad()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    x = torch.randn(batch * 4, 50)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch)
    module, opt, loader, _ = make_private(net, opt, loader, noise_multiplier=sigma, max_grad_norm=clip,
                                          accountant="rdp", history=[])
    rng.attach(opt, loader, rng.secret_generator(), reseed=reseed)
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps // 4):
            for xb, _y in loader:
                opt.zero_grad()
                (module(xb) * 0.0).sum().backward()  # zero gradients: all that remains is the noise
                opt.step()
                grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    noise = torch.stack(grads) * batch  # Opacus divides the summed (noised) gradient by the expected batch size
    assert noise.mean().abs() < 0.02 * sigma * clip
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.05)


def _dp_update(generator=None, seed_global: int | None = None) -> torch.Tensor:
    from fedtl.config import AdaptersConfig, ModelConfig
    from fedtl.model import TransferModel
    from tests.conftest import make_tiny_backbone

    model = TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig())
    feats = torch.linspace(-1, 1, 40 * 16).reshape(40, 16)
    labels = (torch.arange(40) % 2).long()
    before = torch.cat([v.flatten() for v in model.trainable_state().values()])
    if seed_global is not None:
        torch.manual_seed(seed_global)
    train_suffix(model, feats, labels, TrainConfig(lr=0.1, batch_size=8),
                 dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2), generator=generator,
                 reseed=generator is None)
    return torch.cat([v.flatten() for v in model.trainable_state().values()]) - before


def test_noise_is_secret_even_with_the_same_config_data_and_global_seed():
    a, b = _dp_update(seed_global=0), _dp_update(seed_global=0)
    assert not torch.equal(a, b)


def test_seeded_mode_is_reproducible():
    a = _dp_update(rng.seeded_generator(0, "site-1", "run", 3))
    b = _dp_update(rng.seeded_generator(0, "site-1", "run", 3))
    c = _dp_update(rng.seeded_generator(0, "site-2", "run", 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_os_seeds_differ():
    assert len({rng.os_seed() for _ in range(64)}) == 64
    assert np.all(np.array([rng.os_seed() for _ in range(64)]) < 2**63)


def test_a_servers_huge_suffix_cannot_make_the_updates_finiteness_reveal_one_example():
    """Attack: the server sends head weights so large that one example with large features overflows its logits.
    Opacus would clip that example's inf / NaN gradient into NaN and the whole released update would be NaN exactly
    when the example was sampled. The site zeroes non-finite per-sample gradient entries before clipping, so the
    update is finite with or without the example, and still moves by at most the clipping norm per example."""
    from fedtl.config import ModelConfig
    from fedtl.model import SuffixModel
    from fedtl.privacy.policy import steps_per_epoch

    def update(with_outlier: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = SuffixModel("b", "0" * 64, "unit", 8, 2, ModelConfig())
        with torch.no_grad():
            model.suffix.head[0].weight.fill_(1e37)
        x, y = torch.rand(64, 8), torch.randint(0, 2, (64,))
        if with_outlier:
            x[0] = 100.0  # 1e37 × 100 × 8 overflows float32; 1e37 × 8 × [0, 1) does not
        before = model.suffix.head[0].weight.detach().clone()
        dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1 / steps_per_epoch(64, 64))
        train_suffix(model, x, y, TrainConfig(lr=1.0, momentum=0.0, batch_size=64), dp=dp,
                     generator=rng.seeded_generator(0, "s", "r", 1), reseed=False)
        return (model.suffix.head[0].weight.detach().double() - before.double()).flatten()

    plain, attacked = update(False), update(True)
    assert torch.isfinite(plain).all() and torch.isfinite(attacked).all()


# ---- per-sample gradients of grouped convolutions (torch.func instead of Opacus' unfold) ------
def _per_sample_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, route: bool) -> list[torch.Tensor]:
    from opacus import GradSampleModule

    from fedtl.privacy.engine import route_grouped_convs

    if route:
        route_grouped_convs(net)
    gsm = GradSampleModule(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    grads = [p.grad_sample.detach().clone() for p in net.parameters() if p.requires_grad]
    gsm._close()
    return grads


def _depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 8, 3, groups=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    net[0].weight.requires_grad_(False)  # a frozen layer stays what it was
    return net


def test_grouped_convolutions_get_the_same_per_sample_gradients_through_torch_func():
    from fedtl.privacy.engine import GroupedConv2d

    x, y = torch.randn(6, 4, 9, 9), torch.randint(0, 3, (6,))
    closed_form = _per_sample_grads(_depthwise_net(), x, y, route=False)  # Opacus' unfold
    net = _depthwise_net()
    routed = _per_sample_grads(net, x, y, route=True)
    assert [type(m) for m in net] == [nn.Conv2d, GroupedConv2d, GroupedConv2d, nn.AdaptiveAvgPool2d, nn.Flatten,
                                      nn.Linear]
    assert len(routed) == len(closed_form) == 7  # the frozen 1x1 convolution keeps a trainable bias
    for a, b in zip(closed_form, routed):
        assert a.shape == b.shape and a.shape[0] == 6
        assert a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # the same forward and state dict keys: a routed model loads and exports like the original
    assert torch.allclose(_depthwise_net()(x), net(x))
    assert list(net.state_dict()) == list(_depthwise_net().state_dict())


def test_dp_training_routes_grouped_convolutions_and_clips_them():
    from fedtl.privacy.engine import GroupedConv2d

    net = _depthwise_net()
    x, y = torch.randn(16, 4, 9, 9) * 100, torch.randint(0, 3, (16,))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    module, opt, loader, _ = make_private(net, opt, DataLoader(TensorDataset(x, y), batch_size=16),
                                          noise_multiplier=0.0, max_grad_norm=0.01, accountant="rdp", history=[])
    assert type(net[1]) is GroupedConv2d
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    unwrap(module)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in
                       zip([p for p in net.parameters() if p.requires_grad], before)])
    assert 0 < delta.norm() <= 0.1 * 0.01 * (1 + 1e-4)  # every example's whole gradient, grouped layers too, clipped
