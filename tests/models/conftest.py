"""Fixtures for the models tests.

- Freshly initialized networks in ``eval()`` mode (BatchNorm running stats still 0/1) shrink
  activations into float32 denormals, which make CPU convolutions ~100x slower: flush them.
- On a shared 2-core machine a second intra-op thread is often descheduled, and every small op then
  waits for it (a 20 ms forward took 5 s): the tiny networks here run on one thread.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def fast_cpu_math():
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)
