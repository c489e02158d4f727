import numpy as np
import pytest
import torch

from fedtl.data import BUNDLED_PNEUMONIAMNIST, Preprocessing, load_medmnist, partition_indices
from fedtl.errors import DataError


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


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_partitions_are_deterministic_disjoint_and_cover(kind):
    labels = np.array([0] * 120 + [1] * 280)
    a = partition_indices(labels, 5, kind, alpha=0.5, seed=3)
    b = partition_indices(labels, 5, kind, alpha=0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    joined = np.concatenate(a)
    assert len(joined) == len(set(joined.tolist())) == len(labels)
    if kind == "pathological":  # one class per site by default
        assert all(len(np.unique(labels[p])) == 1 for p in a)
