"""Federated data: dataset sources, long-tail profile, partitioners and the prepared Arrow store."""
from fedplatform.data.store import FederatedDataset, open_store, prepare

__all__ = ["FederatedDataset", "open_store", "prepare"]
