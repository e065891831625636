"""A pytest plugin for the client suites (``-p clients_plugin``): every test starts
from the same random state, so that their sampling tests (SMC, AWRS, which draw
from the global generators) give the same outcome on every run."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _same_random_state() -> Iterator[None]:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(0)
    yield
