"""Partitioning a training split across simulated sites, through flwr-datasets partitioners."""

from __future__ import annotations

import numpy as np

from fedtl.errors import ConfigError


def partition_indices(labels: np.ndarray, num_sites: int, kind: str, *, alpha: float = 0.5,
                      classes_per_site: int = 1, seed: int = 42) -> list[np.ndarray]:
    """Indices of each site's examples: deterministic for a seed, disjoint, covering the data.

    The examples are shuffled with a numpy Generator seeded from ``seed`` before any partitioner
    sees them, and the partitions are mapped back to the original indices (each site's sorted).
    flwr-datasets' ``IidPartitioner`` shards contiguously and takes no seed: without the shuffle
    "iid" sites of label-sorted data would each hold a single class.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = int(labels.shape[0])
    if num_sites > n:
        raise ConfigError(f"`federation.sites` must be <= the number of training examples ({n}), got {num_sites}.")
    if num_sites == 1:
        return [np.arange(n, dtype=np.int64)]
    num_classes = int(labels.max()) + 1
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_sites)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_sites, partition_by="label", alpha=alpha, min_partition_size=max(2, min(10, n // (num_sites * 4))),
            self_balancing=True, shuffle=True, seed=seed,
        )
    elif kind == "pathological":
        if classes_per_site > num_classes:
            raise ConfigError(f"`data.classes-per-site` must be <= the number of classes ({num_classes}), got {classes_per_site}.")
        partitioner = PathologicalPartitioner(
            num_partitions=num_sites, partition_by="label", num_classes_per_partition=classes_per_site,
            class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
        )
    else:
        raise ConfigError(f"`data.partitioner` must be one of iid, dirichlet, pathological, got {kind!r}.")
    order = np.random.default_rng(seed).permutation(n)  # position in the shuffled data -> original index
    partitioner.dataset = Dataset.from_dict({"label": labels[order].astype(np.int64).tolist(), "index": order.tolist()})
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)) for i in range(num_sites)]
    except ValueError as exc:  # e.g. Dirichlet could not meet the minimum partition size
        raise ConfigError(f"Could not partition {n} examples into {num_sites} sites with {kind!r}: {exc}") from exc
    return parts
