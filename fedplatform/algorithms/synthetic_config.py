"""The synthetic load's settings (the `algorithm:` section of `synthetic.py`); no torch, so
validating a pipeline stays cheap."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedplatform.config import Section


class SyntheticConfig(Section):
    """Synthetic load for measuring the platform: each client busy-waits `work_s` seconds and
    returns the global weights of `model.name` unchanged."""

    name: Literal["synthetic"] = "synthetic"
    work_s: float = Field(0.5, ge=0.0)
    update_mb: float = Field(0.0, ge=0.0)
    """Extra float32 entry of this many MB in the state; each client fills it from its generator,
    so updates differ (for measuring aggregation at a chosen update size)."""
