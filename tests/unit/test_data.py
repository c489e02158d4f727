import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtl.data import BUNDLED_PNEUMONIAMNIST, Preprocessing, load_medmnist, partition_indices
from fedtl.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_pneumoniamnist_is_the_official_file():
    src = load_medmnist(BUNDLED_PNEUMONIAMNIST)
    assert (len(src.train), len(src.val), len(src.test)) == (4708, 524, 624)
    assert src.num_classes == 2
    assert src.test.class_counts(2) == [234, 390]


def test_missing_and_corrupt_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_medmnist(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_medmnist(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="lacks the MedMNIST keys"):
        load_medmnist(partial)


MEAN, STD = (0.5, 0.4, 0.3), (0.5, 0.2, 0.1)


def _rgb_gradient(h: int = 20, w: int = 28) -> np.ndarray:
    """(1, h, w, 3) uint8: red rises left to right, green top to bottom, blue along the diagonal."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], axis=-1)
    return rgb.astype(np.uint8)[None]


def _reference(images_bchw: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images_bchw.float() / 255.0, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("size", [32, 12])  # up- and downsampling
def test_preprocessing_rgb_gradient_matches_interpolate_and_per_channel_normalization(size):
    pre = Preprocessing(resolution=size, mean=MEAN, std=STD)
    img = _rgb_gradient()
    x = pre(img)
    assert x.shape == (1, 3, size, size) and x.dtype == torch.float32
    ref = _reference(torch.as_tensor(img).permute(0, 3, 1, 2), size)
    assert torch.allclose(x, ref, atol=1e-5)
    # Independent of interpolate: each channel keeps its own direction, and normalization is per channel.
    raw = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    red, green = raw[0, 0], raw[0, 1]
    assert (red[:, 1:] - red[:, :-1] > 0).all() and torch.allclose(red[1:], red[:-1], atol=1e-5)  # varies with x only
    assert (green[1:] - green[:-1] > 0).all() and torch.allclose(green[:, 1:], green[:, :-1], atol=1e-5)
    assert 0.0 <= raw.min() and raw.max() <= 1.0


def test_preprocessing_upsamples_a_ramp_linearly():
    """Bilinear resize of a linear ramp is the ramp sampled at the output pixel centres (away from the edges)."""
    pre = Preprocessing(resolution=40, mean=MEAN, std=STD)
    img = _rgb_gradient(h=20, w=20)
    red = (pre(img)[0, 0] * STD[0] + MEAN[0]).numpy()
    src = (np.arange(40) + 0.5) * 20 / 40 - 0.5  # source x of each output column
    expected = np.interp(src, np.arange(20), img[0, 0, :, 0] / 255.0)
    assert np.allclose(red[10, 1:-1], expected[1:-1], atol=1e-5)


def test_preprocessing_gray_gradient_and_rgba():
    pre = Preprocessing(resolution=32, mean=MEAN, std=STD)
    rgb = _rgb_gradient()
    gray = rgb[..., 0]
    x = pre(gray)
    ref = _reference(torch.as_tensor(gray)[:, None].expand(-1, 3, -1, -1), 32)
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x, ref, atol=1e-5)
    raw = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(raw[0, 0], raw[0, 1], atol=1e-6) and torch.allclose(raw[0, 0], raw[0, 2], atol=1e-6)
    alpha = np.full(rgb.shape[:-1] + (1,), 7, np.uint8)
    assert torch.allclose(pre(np.concatenate([rgb, alpha], axis=-1)), pre(rgb))  # alpha is dropped
    read_only = rgb.copy()
    read_only.flags.writeable = False
    assert torch.equal(pre(read_only), pre(rgb))
    with pytest.raises(ValueError, match="expected images of shape"):
        pre(np.zeros((2, 3), np.uint8))


KINDS = ["iid", "dirichlet", "pathological"]
SORTED_LABELS = np.array([0] * 1200 + [1] * 2800)  # sorted by label: contiguous shards would be one class each


@pytest.mark.parametrize("kind", KINDS)
def test_partitions_are_deterministic_disjoint_and_cover(kind):
    a = partition_indices(SORTED_LABELS, 5, kind, alpha=0.5, seed=3)
    b = partition_indices(SORTED_LABELS, 5, kind, alpha=0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    joined = np.concatenate(a)
    assert len(joined) == len(set(joined.tolist())) == len(SORTED_LABELS)
    if kind == "pathological":  # one class per site by default; the labels survive the shuffle's mapping back
        assert all(len(np.unique(SORTED_LABELS[p])) == 1 for p in a)


def test_iid_sites_hold_the_global_class_mix_even_on_label_sorted_data():
    global_share = SORTED_LABELS.mean()  # 0.7 of class 1
    for seed in (0, 1, 42):
        parts = partition_indices(SORTED_LABELS, 5, "iid", seed=seed)
        shares = [SORTED_LABELS[p].mean() for p in parts]
        assert all(abs(s - global_share) <= 0.10 for s in shares), (seed, shares)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_seed_chooses_the_partition(kind):
    a = partition_indices(SORTED_LABELS, 5, kind, alpha=0.5, seed=3)
    b = partition_indices(SORTED_LABELS, 5, kind, alpha=0.5, seed=4)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow  # a fresh interpreter importing `datasets`: a few seconds
def test_the_same_seed_gives_the_same_partition_in_another_process():
    """No hidden state (hash seed, global RNG, import order) decides who holds what."""
    code = ("import json, sys, numpy as np; from fedtl.data import partition_indices\n"
            "labels = np.array([0] * 1200 + [1] * 2800)\n"
            "print(json.dumps({k: [p.tolist() for p in partition_indices(labels, 5, k, alpha=0.5, seed=3)]\n"
            "                  for k in ('iid', 'dirichlet', 'pathological')}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), PYTHONHASHSEED="7")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    np.random.seed(99)  # the global RNG must not matter here either
    for kind in KINDS:
        here = [p.tolist() for p in partition_indices(SORTED_LABELS, 5, kind, alpha=0.5, seed=3)]
        assert there[kind] == here
