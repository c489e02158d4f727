"""Randomness that protects privacy: DP-SGD's Gaussian noise and its Poisson sampling.

Opacus' ``secure_mode=True`` gives two properties: (1) noise and sampling come from a
cryptographically secure generator (``torchcsprng``), and (2) each noise value is the sum of
four Gaussian draws, halved, which defeats the floating-point attack on the Gaussian mechanism
(Opacus ``optimizers/optimizer.py::_generate_noise``). ``torchcsprng`` has no build for the torch
this project pins, so fedtl reaches (1) another way and keeps Opacus' own code for (2):

* one ``torch.Generator`` per local round drives both the Poisson masks and the noise;
* it is seeded from the operating system's CSPRNG (:func:`secrets.randbits`) and **re-seeded
  with fresh OS entropy before every noise draw**, so each step's mask and noise depend on 64
  new secret bits that no party — server, other sites, config, round number or the global torch
  seed — knows or influences;
* the optimizer runs with ``secure_mode=True``, so Opacus' ``_generate_noise`` applies its
  four-draw mitigation with that generator.

``docs/privacy.md`` states what this does and does not protect. A seeded mode (``seeded``) exists
for reproducible simulations only; deployed sites refuse it (:class:`fedtl.privacy.policy.PrivacyPolicy`).
"""

from __future__ import annotations

import hashlib
import secrets

import torch


def os_seed() -> int:
    """64 bits from the operating system's CSPRNG (``getrandom`` / ``/dev/urandom``)."""
    return secrets.randbits(63)  # torch seeds are signed-int64 friendly below 2**63


def secret_generator() -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(os_seed())
    return gen


def seeded_generator(*parts: object) -> torch.Generator:
    """A reproducible generator for simulations: seeded from ``parts`` (seed, site, round…)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    return gen


def attach(optimizer, loader, generator: torch.Generator, *, reseed: bool) -> None:
    """Make an Opacus DP optimizer and its Poisson data loader draw from ``generator``.

    ``reseed``: draw fresh OS entropy into the generator before every noise draw (deployed sites
    and the default simulation); off only in the seeded simulation mode.
    """
    optimizer.generator = generator
    optimizer.secure_mode = True  # Opacus' floating-point-attack mitigation (sum of 4 draws / 2)
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or not hasattr(sampler, "generator"):
        raise TypeError("expected an Opacus DPDataLoader with a Poisson batch sampler")
    sampler.generator = generator
    if reseed:
        add_noise = optimizer.add_noise

        def reseeded_add_noise() -> None:
            generator.manual_seed(os_seed())
            add_noise()

        optimizer.add_noise = reseeded_add_noise
