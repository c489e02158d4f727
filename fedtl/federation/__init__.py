"""Flower glue: records, the validating FedAvg strategy, the apps, simulation."""
