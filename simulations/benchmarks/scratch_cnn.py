"""The "no transfer" row of the benchmark (issue 11, item 4): a small CNN trained from scratch.

Same federation, same sites, same privacy path (each site's policy, ledger, noise calibration and
DP-SGD through Opacus in ``train_site``) as the transfer rows; only the model differs: no frozen prefix,
every parameter trains and is sent. The network is Opacus' MNIST example CNN (Papernot et al., "Tempered
Sigmoid Activations for Deep Learning with Differential Privacy", 2021: tanh activations, 28 × 28 input),
a standard from-scratch baseline for DP-SGD at this resolution. Its "features" are the images themselves
at their native 28 × 28, scaled to [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtl.model import _TrainableSuffix


class SmallCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(1))
        self.head = nn.Sequential(nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ScratchModel(_TrainableSuffix, nn.Module):
    """Every parameter is trainable ("suffix" = the whole network); the conv layers form the second
    parameter group at ``lr × lr_scale``, as adapters do in the transfer model."""

    def __init__(self, channels: int, num_classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.suffix = SmallCNN(channels, num_classes)
        self.adapter_params = list(self.suffix.features.parameters())
        self.backbone_name, self.weights_sha256, self.split_name = "scratch-cnn", "", "input"
        self.num_classes = num_classes
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(x)


def scratch_features(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) or (N, 28, 28, C) uint8 → (N, C, 28, 28) float in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 127.5 - 1.0
    if x.ndim == 3:
        return x.unsqueeze(1)
    return x.permute(0, 3, 1, 2).contiguous()
