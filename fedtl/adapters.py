"""Trainable parts of the suffix's backbone blocks: PEFT LoRA, or selective unfreezing.

BatchNorm layers are never made trainable: they stay frozen (eval mode, running statistics
untouched), which keeps per-sample gradients well defined for DP-SGD.
"""

from __future__ import annotations

from torch import nn

from fedtl.config import AdaptersConfig


def lora_targets(blocks: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap exactly: dense convolutions and linear layers.

    Depthwise/grouped convolutions are skipped, and so are timm's TF-"same"-padded convolutions
    with a kernel larger than 1 (their padding is computed in forward, which LoRA's copy lacks).
    """
    names = []
    for name, module in blocks.named_modules():
        if isinstance(module, nn.Linear):
            names.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            one_by_one = module.kernel_size == (1, 1) and module.stride == (1, 1)
            if one_by_one or type(module) is nn.Conv2d:
                names.append(name)
    return names


def apply_lora(blocks: nn.Module, cfg: AdaptersConfig) -> list[nn.Parameter]:
    """Inject LoRA adapters (PEFT) into ``blocks`` in place; return the adapter parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(blocks)
    if not targets:
        raise ValueError("the suffix blocks contain no layer LoRA can adapt; use adapters.kind = 'unfreeze'")
    for p in blocks.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    inject_adapter_in_model(config, blocks)
    params = []
    for name, p in blocks.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            params.append(p)
    return params


def apply_unfreeze(blocks: nn.Module) -> list[nn.Parameter]:
    """Make the convolution and linear weights of ``blocks`` trainable; BatchNorm stays frozen."""
    params = []
    for module in blocks.modules():
        trainable = isinstance(module, (nn.Conv2d, nn.Linear))
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
            if trainable:
                params.append(p)
    return params
