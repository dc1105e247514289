"""Ray Tune sweeps over pipeline configs (`fedplatform sweep`)."""
from fedplatform.tune.sweep import SweepResult, SweepSpec, load_spec, run_sweep

__all__ = ["SweepResult", "SweepSpec", "load_spec", "run_sweep"]
