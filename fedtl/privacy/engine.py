"""DP-SGD on the trainable suffix through Opacus, with the accountant history carried in.

Per-sample gradients come from Opacus' hooks (closed forms for linear and dense convolution layers), except for
trainable grouped convolutions (the depthwise convolutions of an unfrozen EfficientNet unit): Opacus' closed form
unfolds them into a dense matrix per example, and ``torch.func`` (Opacus' own fallback for the layers it has no
closed form for) computes the same gradients about 10 times faster on the CPU (``block4_2`` unfrozen, 64 examples:
1.3–1.6 s against 0.13–0.15 s a step, ``simulations/benchmarks/dp_step_time.py``). Such a layer is given the type
:class:`GroupedConv2d`, which Opacus does not register, so only it takes the ``torch.func`` path.
"""

from __future__ import annotations

import warnings

from torch import nn, optim
from torch.utils.data import DataLoader


class GroupedConv2d(nn.Conv2d):
    """A grouped (e.g. depthwise) convolution, unchanged but for its type: Opacus computes its per-sample
    gradients with ``torch.func`` instead of its unfold-based closed form (same gradients, ~10× faster here)."""


def route_grouped_convs(module: nn.Module) -> int:
    """Give every trainable grouped ``nn.Conv2d`` of ``module`` the type :class:`GroupedConv2d` (in place: same
    parameters, same forward, same state-dict keys); return how many. Subclasses (timm's ``Conv2dSame``) are left
    alone: Opacus already has no closed form for them."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and m.groups > 1 and any(p.requires_grad for p in m.parameters(recurse=False)):
            m.__class__ = GroupedConv2d
            n += 1
    return n


def make_private(module: nn.Module, optimizer: optim.Optimizer, loader: DataLoader, *, noise_multiplier: float,
                 max_grad_norm: float, accountant: str, history: list[tuple[float, float, int]], seed: int | None = None):
    """Wrap ``module`` (the suffix only: the frozen prefix never reaches Opacus) for DP-SGD.

    Returns ``(module, optimizer, loader, engine)``; ``engine.accountant.history`` continues
    ``history`` and holds the site's cumulative spend after training.
    """
    from opacus import PrivacyEngine

    route_grouped_convs(module)
    with warnings.catch_warnings():
        # Opacus notes that its secure RNG is off (fine for simulation; see docs for deployment).
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=accountant)
        engine.accountant.history = [tuple(h) for h in history]
        module, optimizer, loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
        )
    return module, optimizer, loader, engine


def unwrap(module: nn.Module) -> nn.Module:
    """The original module inside an Opacus GradSampleModule (hooks removed)."""
    from opacus import GradSampleModule

    if isinstance(module, GradSampleModule):
        inner = module._module
        module._close()  # removes hooks and the per-sample gradient attributes
        return inner
    return module
