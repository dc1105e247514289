"""Ray Tune sweeps over pipeline configs (`fedplatform sweep`)."""
from fedplatform.tune.space import SweepSpec, load_spec
from fedplatform.tune.summary import SweepResult
from fedplatform.tune.sweep import run_sweep

__all__ = ["SweepResult", "SweepSpec", "load_spec", "run_sweep"]
