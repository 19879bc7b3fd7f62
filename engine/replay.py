"""Rollouts from an earlier student, cached: --rollout-refresh K for OPD and OPSD (Semi-OPD).

Semi-OPD (arXiv 2610.11291, by OPSD's first author) distils on rollouts cached from the
initial student instead of fresh ones. Here the rollout policy is the student as of the last
refresh, and every prompt's G rollouts are kept until the next one:
    K = 1   today's on-policy run: the current student samples every step (nothing here runs)
    K = 0   the initial student samples, once per prompt, for the whole run (Semi-OPD): a
            prompt met again (the next epoch over the data) gets its cached rollouts back
    K > 1   the student is copied as the rollout policy every K steps (steps 1, K+1, 2K+1...)
            and the cache starts afresh with it
The losses score the cached tokens under the CURRENT student as on-policy rollouts (one update
per batch: ratio 1); the papers' distillation targets need no importance weight, and OPD's
sampled-token advantage is then an off-policy estimate, as in Semi-OPD.

Resume is exact: the cache (token ids, rewards) is saved in trainer_state.pt and the rollout
policy of K > 1 in rollout_policy.safetensors; K = 0's is the run's initial weights, which
every run reloads before its checkpoint.
"""
import copy

import torch

from engine.batch import Batch, from_responses


class Replay:
    """The rollout policy and cache of --rollout-refresh `refresh` (not for refresh == 1)."""

    def __init__(self, model, examples: list, *, refresh: int):
        self.refresh = refresh
        self.policy = copy.deepcopy(model).eval().requires_grad_(False)  # theta_0 until a refresh
        self.index = {id(e): i for i, e in enumerate(examples)}  # a prompt's stable key
        self.cache = {}  # example index -> [(response ids, truncated, text, score, correct)]

    @property
    def has_state(self) -> bool:
        """Weights that the initial model cannot restore (checkpointed)."""
        return self.refresh > 1

    @torch.no_grad()
    def before_step(self, step: int, student):
        """At steps 1, K+1, 2K+1, ... (K > 1): the student becomes the rollout policy, the
        cache starts afresh."""
        if self.refresh > 1 and step > 1 and (step - 1) % self.refresh == 0:
            for p, s in zip(self.policy.parameters(), student.parameters(), strict=True):
                p.copy_(s)
            self.cache.clear()

    def sample(self, sample, exs: list, group_size: int, *, tok, prompts, device) -> Batch:
        """The rows of `exs` (each prompt G times in a row): cached prompts from the cache, the
        others sampled by `sample(rows)` (batch.sample with the rollout policy) and cached."""
        keys = [self.index[id(exs[i])] for i in range(0, len(exs), group_size)]
        fresh = [i for i, k in enumerate(keys) if k not in self.cache]
        if fresh:
            rows = [exs[i * group_size + j] for i in fresh for j in range(group_size)]
            b = sample(rows)
            for n, i in enumerate(fresh):
                g = slice(n * group_size, (n + 1) * group_size)
                ids = [r[m.bool()].tolist() for r, m in zip(b.resp_ids[g], b.resp_mask[g])]
                self.cache[keys[i]] = [(x, bool(t), s, float(r), bool(c)) for x, t, s, r, c in
                                       zip(ids, b.truncated[g].tolist(), b.texts[g],
                                           b.rewards[g].tolist(), b.correct[g].tolist())]
        rows = [r for k in keys for r in self.cache[k]]
        return from_responses(tok, exs, rows, prompts=prompts, device=device)

    def state(self) -> dict:
        return {"cache": {str(k): [list(r) for r in v] for k, v in self.cache.items()}}

    def load_state(self, state: dict):
        self.cache = {int(k): [tuple(r) for r in v] for k, v in state["cache"].items()}
