import sys
from pathlib import Path

import pytest
import torch

# Let `tests/checks.py` be imported as `checks` from any test module.
sys.path.insert(0, str(Path(__file__).parent))

# The suite works on small tensors, where a second intra-op thread only adds
# synchronisation (and, on a busy machine, oversubscription).
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (and torch's RNG seeded)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
