from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedtl.backbones import Backbone, BackboneSpec

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def tiny_spec() -> BackboneSpec:
    return BackboneSpec(name="tiny", library="test", architecture="tiny", input_size=16, channels=3,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), feature_dim=16, weights_file="tiny.pth",
                        weights_source="random")


def make_tiny_backbone(seed: int = 0) -> Backbone:
    """Conv-BN-ReLU units with non-trivial BatchNorm statistics: a stand-in where the real network is not the point."""
    torch.manual_seed(seed)

    def unit(cin: int, cout: int, k: int) -> nn.Sequential:
        bn = nn.BatchNorm2d(cout)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), bn, nn.ReLU())

    units = [("stem", unit(3, 8, 3)), ("b1", unit(8, 8, 1)), ("b2", unit(8, 12, 1)), ("head_conv", unit(12, 16, 1))]
    for _, m in units:
        m.eval()
    return Backbone(spec=tiny_spec(), units=units, classifier=None, weights_sha256="0" * 64)


@pytest.fixture
def tiny_backbone() -> Backbone:
    return make_tiny_backbone()


@pytest.fixture
def toy_images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=64)
    images = rng.integers(0, 80, size=(64, 12, 12)).astype(np.uint8)
    images[labels == 1, 3:9, 3:9] += 150  # a bright square marks class 1
    return images, labels.astype(np.int64)


def write_small_medmnist(path: Path, n_train: int = 240, n_val: int = 80, n_test: int = 80, seed: int = 0) -> Path:
    """A MedMNIST-format npz cut from the bundled PneumoniaMNIST (real images, fewer of them)."""
    from fedtl.data.sources import write_medmnist_sample

    return write_medmnist_sample(path, n_train, n_val, n_test, seed)


@pytest.fixture(autouse=True)
def simulate_in_process(monkeypatch, request):
    """Unit tests call `fedtl simulate` in this process (its validation is the point); the supervisor
    that runs it as a child process tree is exercised by the e2e tests."""
    if request.node.get_closest_marker("e2e") is None:
        monkeypatch.setenv("FEDTL_SIMULATE_CHILD", "1")
