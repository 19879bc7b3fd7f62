"""Shared test setup: repo root on sys.path, a deterministic hypothesis profile, helpers."""
import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# derandomize: the same examples every run, so CI is reproducible; deadline off because the
# first torch call of a process is slow
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
torch.set_num_threads(1)


def randn(seed, *shape, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
