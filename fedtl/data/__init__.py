"""Data sources, backbone-aligned preprocessing and partitioning."""

from fedtl.data.partition import partition_indices
from fedtl.data.preprocess import Preprocessing
from fedtl.data.sources import BUNDLED_PNEUMONIAMNIST, ImageSet, MedMNISTSource, load_medmnist, resolve_data_path

__all__ = ["BUNDLED_PNEUMONIAMNIST", "ImageSet", "MedMNISTSource", "Preprocessing", "load_medmnist",
           "partition_indices", "resolve_data_path"]
