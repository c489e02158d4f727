"""fedtl: federated transfer learning with a frozen pretrained prefix and a private trainable suffix."""

__version__ = "0.1.0"
