"""The "full fine-tuning" row of the benchmark (issue 11, item 4): every weight of the pretrained network trains.

What a plain Flower + Opacus user would run: the ImageNet EfficientNet-Lite0 with a new head, BatchNorm replaced by
GroupNorm (Opacus cannot train BatchNorm; each GroupNorm starts from the BatchNorm's affine weights), every
parameter trainable and sent each round. Same federation, same sites, same privacy path (each site's policy,
ledger, noise calibration and DP-SGD in ``train_site``) as the transfer rows — only the model differs, as for
``scratch_cnn.py``. Its "features" are the preprocessed images themselves (one view: no prefix, no cache). The
backbone's weights form the second parameter group at ``lr × adapters.lr-scale`` (0.1 unless set), as for
``adapters.kind = unfreeze``. Opacus computes the depthwise convolutions' per-sample gradients with ``torch.func``
(``fedtl.privacy.engine.route_grouped_convs``; with its unfold path a step took 23 s at 112 px).
"""

from __future__ import annotations

import torch
from torch import nn

from fedtl.config import FedTLConfig
from fedtl.model import _TrainableSuffix


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (timm's BatchNormAct2d included) by GroupNorm + its activation, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            gn = nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0), c)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            act = getattr(child, "act", nn.Identity())
            setattr(module, name, nn.Sequential(gn, act))
        else:
            batchnorm_to_groupnorm(child)
    return module


class FullNetwork(nn.Module):
    def __init__(self, features: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(width, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def full_network(cfg: FedTLConfig, num_classes: int) -> FullNetwork:
    """The pretrained backbone (``model.backbone``, hash-checked weights) with GroupNorm and a zero-initialized head."""
    from opacus.validators import ModuleValidator

    from fedtl.backbones import build_backbone

    bb = build_backbone(cfg.model.backbone)
    features = ModuleValidator.fix(batchnorm_to_groupnorm(bb.features()))
    for m in features.modules():  # Opacus' backward hooks forbid in-place activations on hooked outputs
        if hasattr(m, "inplace"):
            m.inplace = False
    for p in features.parameters():
        p.requires_grad_(True)
    return FullNetwork(features, bb.spec.feature_dim, num_classes)


class FullModel(_TrainableSuffix, nn.Module):
    """Every parameter is trainable ("suffix" = the whole network)."""

    def __init__(self, cfg: FedTLConfig, num_classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.suffix = full_network(cfg, num_classes)
        self.adapter_params = list(self.suffix.features.parameters())
        self.backbone_name, self.weights_sha256, self.split_name = cfg.model.backbone, "", "input"
        self.num_classes = num_classes
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(x)


def full_features(cfg: FedTLConfig, images) -> torch.Tensor:
    """Images → the backbone's input at ``model.resolution`` (its own resizing and normalization), one view."""
    from fedtl.federation.site import preprocessing_for

    return preprocessing_for(cfg)(images)
