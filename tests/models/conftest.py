"""Fixtures for the models tests.

Freshly initialized networks in ``eval()`` mode (BatchNorm running stats still 0/1) shrink activations
into float32 denormals, which make CPU convolutions ~100x slower; flushing them keeps the suite fast.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
