"""What every optimizer step shares: mini- and micro-batches, metrics with their own
denominators, the learning-rate schedule, and the clipped AdamW step.

The RL update of a mini-batch (steps 6-7 of train.train_step) is train.update_mini_batch; the
SFT step of the warm start is engine/sft.py; both go through losses.backward_chunked. The one
rule everything keeps: a loss is a SUM over tokens divided by a GLOBAL count (all
micro-batches, all ranks), so splitting a batch into micro-batches, chunks of positions or
processes never changes the gradient.
"""
import math

import torch


def micro_batches(b, size: int) -> list:
    """Rows per forward/backward (0: all of this rank's rows). Groups may be split here: group
    statistics (advantages, siblings, routing) were computed on the whole batch already."""
    size = size or len(b.examples)
    return [b.select_rows(slice(i, i + size)) for i in range(0, len(b.examples), size)]


def rollout_mini_batches(b, *, prompts: int, group_size: int, world: int) -> list:
    """This rank's rows cut into mini-batches of `prompts` prompts over all ranks (verl's
    ppo_mini_batch_size; 0: the whole batch), one optimizer step each, whole groups each (group
    statistics were computed on the whole batch already)."""
    if not prompts:
        return [b]
    rows = prompts // world * group_size
    return [b.select_rows(slice(i, i + rows)) for i in range(0, len(b.examples), rows)]


def updates_per_batch(prompts_per_step: int, mini_batch_size: int, epochs: int) -> int:
    """Optimizer steps per rollout batch: mini-batches per pass times passes (--ppo-epochs)."""
    return epochs * (prompts_per_step // (mini_batch_size or prompts_per_step))


class Metrics:
    """Each metric as (sum, count) over its own tokens or rows, added up over chunks,
    micro-batches and ranks before dividing: a mean over exactly the tokens it is about."""

    def __init__(self):
        self.sums = {}

    def add(self, stats: dict):
        for k, (s, n) in stats.items():
            s0, n0 = self.sums.get(k, (0.0, 0.0))
            self.sums[k] = (s0 + s.double(), n0 + n.double())

    def means(self, dist) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)  # the same order on every rank
        totals = dist.sum(torch.stack([torch.stack(self.sums[k]) for k in keys])).tolist()
        return {k: s / max(n, 1.0) for k, (s, n) in zip(keys, totals)}


def lr_at(step: int, *, lr: float, warmup: int, schedule: str, steps: int) -> float:
    """The learning rate of optimizer step `step` (from 1): linear warm-up to `lr` over
    `warmup` steps, then constant, linear decay or cosine decay toward 0 at `steps`. A
    function of the step alone, so a resumed run continues the schedule exactly."""
    if warmup and step < warmup:
        return lr * step / warmup
    progress = (step - 1 - warmup) / max(1, steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return lr * (1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def clip_and_step(model, opt, *, loss: float, lr: float, max_grad_norm: float):
    """Clip the (already synced) gradients to `max_grad_norm` and step at `lr`, unless the loss
    or the norm is not finite: a NaN step would poison the weights for good. `loss` and the
    norm are global values, so every rank takes the same decision. Returns (grad_norm,
    skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
    skipped = not (math.isfinite(norm) and math.isfinite(loss))
    if not skipped:
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped
