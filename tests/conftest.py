"""Shared fixtures: small seeded data sets and models."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp as gp


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def make_model(dtype: str = "float64", seed: int = 0, widths=(4, 8, 3), act: str = "tanh") -> gp.Sequential:
    layers = [gp.Dense(widths[i], widths[i + 1], act if i < len(widths) - 2 else None) for i in range(len(widths) - 1)]
    return gp.Sequential(*layers, dtype=dtype, seed=seed)


@pytest.fixture
def spirals_small():
    x, y = gp.datasets.spirals(600, 3, noise=0.3, turns=1.0, seed=0)
    return gp.datasets.split(x, y, 0.2)
