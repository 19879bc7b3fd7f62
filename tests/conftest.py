"""Shared test setup: repo root on sys.path, a deterministic hypothesis profile, helpers."""
import os
import sys

import pytest
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


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One tiny toy warm start (30 SFT steps), shared by every end-to-end test."""
    import train
    d = str(tmp_path_factory.mktemp("cache"))
    train.main(["--algo", "grpo", "--steps", "0", "--cache-dir", d, "--eval-data", "", "--eval-n", "4",
                "--warm-start-steps", "30", "--out", os.path.join(d, "warm")])
    return d


def warm_start_dir(cache_dir, steps=30):
    """The cached seed-0 warm-start checkpoint of `steps` SFT steps (the `cache` fixture's: 30;
    other tests may add other seeds to the same cache): a Hugging Face model directory."""
    (name,) = [n for n in os.listdir(cache_dir)
               if n.startswith(f"toy-student-sft{steps}-seed0-") and "." not in n]
    return os.path.join(cache_dir, name)


def chunk_logits(model, *batch, chunks, **kwargs):
    """The trainer's path to logits: the hidden states of one forward, then the LM head a chunk
    of positions at a time (engine/teachers.py), concatenated."""
    from engine.teachers import lm_head_logits, response_hidden
    h = response_hidden(model, *batch, **kwargs)
    return torch.cat([lm_head_logits(model, h[:, t0:t1]) for t0, t1 in chunks], dim=1)
