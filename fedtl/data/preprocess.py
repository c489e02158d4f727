"""Preprocessing aligned to the backbone: grayscale → 3 channels, resize, the backbone's normalization."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


# View k of an image: the image translated by VIEW_SHIFTS[k] steps of 1/14 of its side, edges repeated; view 0 is the
# image itself. Training views (``train.views``, fedtl.features.ShiftedView) shift the stored pixels; test-time views
# (``evaluation.views``) shift the resized image in [0, 1] (:func:`shift_view`), which an exported model can do too.
VIEW_SHIFTS = ((0, 0), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1), (-1, 0))


def shift_view(x: torch.Tensor, k: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """View ``k`` of ``(B, C, H, W)`` images: translated by ``VIEW_SHIFTS[k]`` steps of ``round(side / 14)`` pixels,
    the uncovered border filled with the edge pixels (torch ops only: traced into ONNX / TorchScript as they are;
    an exported model passes its fixed ``size`` so that no shape is read while tracing)."""
    dy, dx = VIEW_SHIFTS[k]
    if (dy, dx) == (0, 0):
        return x
    h, w = size if size is not None else (int(x.shape[-2]), int(x.shape[-1]))
    step = max(1, round(min(h, w) / 14))
    padded = F.pad(x, (step, step, step, step), mode="replicate")
    top, left = step - dy * step, step - dx * step
    return padded[..., top:top + h, left:left + w]


@dataclass(frozen=True)
class Preprocessing:
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    view: int = 0  # a test-time view (shift_view) of the resized image; 0: the image itself

    @classmethod
    def for_backbone(cls, spec, resolution: int) -> Preprocessing:
        return cls(resolution=resolution, mean=tuple(spec.mean), std=tuple(spec.std))

    def key(self) -> dict:
        key = asdict(self)
        if not self.view:  # the key entries had before views existed: their cached features stay valid
            del key["view"]
        return key

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W)`` / ``(B, H, W, C)`` → float ``(B, 3, R, R)``, normalized (and shifted: ``view``)."""
        return self.normalize(shift_view(self.to_unit(images), self.view))

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
