"""DP-SGD on the trainable suffix through Opacus, with the accountant history carried in."""

from __future__ import annotations

import warnings

from torch import nn, optim
from torch.utils.data import DataLoader


def make_private(module: nn.Module, optimizer: optim.Optimizer, loader: DataLoader, *, noise_multiplier: float,
                 max_grad_norm: float, accountant: str, history: list[tuple[float, float, int]], seed: int | None = None):
    """Wrap ``module`` (the suffix only: the frozen prefix never reaches Opacus) for DP-SGD.

    Returns ``(module, optimizer, loader, engine)``; ``engine.accountant.history`` continues
    ``history`` and holds the site's cumulative spend after training.
    """
    from opacus import PrivacyEngine

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
