"""fedplatform: CLIP-guided federated learning on heterogeneous and long-tailed data, on Ray."""
__version__ = "0.1.0"
