"""torchvision backbones through its weights API.

Weights come from torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) when present and are
downloaded otherwise; offline and uncached, the error names the expected file and folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from urllib.error import URLError

from torch import nn

from fedtl.backbones.registry import (Backbone, BackboneSpec, file_sha256, hub_checkpoint_dir, register,
                                     weights_candidates)
from fedtl.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# torchvision's ImageNet-1k V1 weight files (``get_model_weights(arch).IMAGENET1K_V1.url``), written out so that
# listing or looking up a spec never imports torchvision.models; tests/unit/test_backbones.py checks them.
WEIGHTS_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "mobilenet_v3_small": "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
}


def _weights_enum(arch: str):
    import torchvision.models as tvm

    return tvm.get_model_weights(arch).IMAGENET1K_V1


def _resnet_units(m: nn.Module) -> list[tuple[str, nn.Module]]:
    units = [("stem", nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool))]
    for li in range(1, 5):
        for bi, block in enumerate(getattr(m, f"layer{li}")):
            units.append((f"layer{li}_{bi}", block))
    return units


def _densenet_units(m: nn.Module) -> list[tuple[str, nn.Module]]:
    f = m.features
    units = [("stem", nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0))]
    for name, child in f.named_children():
        if name.startswith(("denseblock", "transition")):
            units.append((name, child))
    units.append(("final_norm", nn.Sequential(f.norm5, nn.ReLU(inplace=False))))
    return units


def _mobilenet_units(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"features{i}", child) for i, child in enumerate(m.features)]


def _builder(arch: str, cut: Callable[[nn.Module], list[tuple[str, nn.Module]]], head: Callable[[nn.Module], nn.Module]):
    def build(spec: BackboneSpec) -> Backbone:
        import torch
        import torchvision.models as tvm

        weights = _weights_enum(arch)
        filename = os.path.basename(weights.url)
        local = next((p for p in weights_candidates(spec) if p.is_file()), None)
        if local is None and os.environ.get("FEDTL_OFFLINE") == "1":
            raise _unavailable(spec, filename, "FEDTL_OFFLINE=1 forbids downloading")
        try:
            if local is not None:
                state = torch.load(local, map_location="cpu", weights_only=True)
            else:
                state = weights.get_state_dict(progress=False, check_hash=True)
        except (URLError, OSError, RuntimeError) as exc:
            raise _unavailable(spec, filename, f"download failed: {exc}") from exc
        cached = local or hub_checkpoint_dir() / filename
        model = tvm.get_model(arch, weights=None)
        model.load_state_dict(state)
        model.eval()
        digest = file_sha256(cached) if cached.is_file() else ""
        return Backbone(spec=spec, units=cut(model), classifier=head(model), weights_sha256=digest, weights_path=str(cached))

    return build


def _unavailable(spec: BackboneSpec, filename: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"Pretrained weights for `{spec.name}` are unavailable ({why}). Expected `{filename}` in "
        f"{hub_checkpoint_dir()}: copy it there or set TORCH_HOME to the folder holding hub/checkpoints/{filename}, "
        "or run once with internet access."
    )


def _spec(name: str, arch: str, feature_dim: int, description: str) -> BackboneSpec:
    url = WEIGHTS_URLS[arch]
    return BackboneSpec(
        name=name,
        library="torchvision",
        architecture=arch,
        input_size=224,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=feature_dim,
        weights_file=os.path.basename(url),
        weights_source=url,
        weights_sha256=None,  # torchvision publishes only the hash prefix in the file name
        description=description,
    )


register(_spec("resnet18", "resnet18", 512, "ResNet-18, ImageNet-1k V1"), _builder("resnet18", _resnet_units, lambda m: m.fc))
register(_spec("resnet50", "resnet50", 2048, "ResNet-50, ImageNet-1k V1"), _builder("resnet50", _resnet_units, lambda m: m.fc))
register(
    _spec("densenet121", "densenet121", 1024, "DenseNet-121, ImageNet-1k V1"),
    _builder("densenet121", _densenet_units, lambda m: m.classifier),
)
register(
    _spec("mobilenet_v3_small", "mobilenet_v3_small", 576, "MobileNetV3-Small, ImageNet-1k V1"),
    _builder("mobilenet_v3_small", _mobilenet_units, lambda m: m.classifier),
)
