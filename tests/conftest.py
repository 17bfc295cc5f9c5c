import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# The models under test are tiny: one thread avoids oversubscription (a small batched Jacobian
# measured 22 ms on two threads of a loaded 2-core machine and 0.3 ms on one).
torch.set_num_threads(1)

# Property tests draw models and run ODE solves: allow slow examples, keep the count modest,
# and derandomize so CI is reproducible.
settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official-tiny-a"


@pytest.fixture(scope="session")
def fixture_dirs() -> list[Path]:
    """Official-format fixture folders: $COLAPROB_FIXTURES (os.pathsep-separated) or the copy
    of ``official-tiny-a`` kept with the tests, so a bare clone tests itself."""
    env = os.environ.get("COLAPROB_FIXTURES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [FIXTURE]
