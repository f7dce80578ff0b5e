"""Shared fixtures; the model builders and checks live in ``tests/models.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# pytest-xdist's workers start with COLUMNS=80 and LINES=24 in their environment: the CLI's tests set the
# width they check (monkeypatch.setenv), and the piped width is the one without COLUMNS.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

# Small property tests: each example builds a model and two onnxruntime sessions.
settings.register_profile(
    "lrdeploy", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("lrdeploy")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
