"""Test-wide settings: hypothesis profiles ("ci" bounded, the default; "long" for deep runs)."""

import importlib.util
import os

import torch
from hypothesis import HealthCheck, settings

# the tests use tiny models: one thread avoids contention overhead that dwarfs the work, and the
# subprocess workers of the resumption properties use one thread too (the same kernels both sides)
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the integrations' doctests need their optional packages (`make test` installs them; `.[dev]` alone
# does not)
collect_ignore = [
    f"functrain/integrations/{name}.py"
    for name in ("wandb", "optuna")
    if importlib.util.find_spec(name) is None
]
