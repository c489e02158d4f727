"""Registry of named pretrained backbones (timm and torchvision)."""

from fedtl.backbones.registry import Backbone, BackboneSpec, available, build_backbone, get_spec

__all__ = ["Backbone", "BackboneSpec", "available", "build_backbone", "get_spec"]
