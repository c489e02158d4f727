"""Preprocessing aligned to the backbone: grayscale → 3 channels, resize, the backbone's normalization."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocessing:
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def for_backbone(cls, spec, resolution: int) -> Preprocessing:
        return cls(resolution=resolution, mean=tuple(spec.mean), std=tuple(spec.std))

    def key(self) -> dict:
        return asdict(self)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W)`` / ``(B, H, W, C)`` → float ``(B, 3, R, R)``, normalized."""
        return self.normalize(self.to_unit(images))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` in [0, 1] → the backbone's normalization (what an exported model does first)."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_unit(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W)`` / ``(B, H, W, C)`` → float ``(B, 3, R, R)`` in [0, 1], not yet normalized."""
        x = torch.as_tensor(np.array(images, copy=True)) if isinstance(images, np.ndarray) and not images.flags.writeable else torch.as_tensor(images)
        if x.ndim == 3:  # (B, H, W) grayscale
            x = x.unsqueeze(1)
        elif x.ndim == 4:  # (B, H, W, C)
            x = x.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"expected images of shape (B, H, W) or (B, H, W, C), got {tuple(x.shape)}")
        x = x.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:  # RGBA: drop alpha
            x = x[:, :3]
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode=self.interpolation,
                              align_corners=False, antialias=True)
        return x
