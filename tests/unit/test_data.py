import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_preprocessing_gray_to_three_channels_resized_and_normalized():
    pre = Preprocessing(resolution=32, mean=(0.5, 0.4, 0.3), std=(0.5, 0.2, 0.1))
    images = np.full((2, 28, 28), 255, np.uint8)
    x = pre(images)
    assert x.shape == (2, 3, 32, 32)
    expected = torch.tensor([(1 - 0.5) / 0.5, (1 - 0.4) / 0.2, (1 - 0.3) / 0.1])
    assert torch.allclose(x[0, :, 10, 10], expected, atol=1e-5)
    rgb = np.zeros((1, 20, 20, 3), np.uint8)
    assert pre(rgb).shape == (1, 3, 32, 32)


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
