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


class Displacement:
    """How far training has moved the weights: ||theta - theta_0|| / ||theta_0|| over the
    trainable parameters (with LoRA: the adapters), theta_0 as the run started (before a
    resume's checkpoint is loaded, so a resumed run measures from the same start). A run whose
    value stays near 0 learns nothing, whatever its loss does (arXiv 2610.11247 measures
    0.025-0.098% for OPD with large teachers). The copy of theta_0 costs one more copy of the
    trainable weights (each rank: its shard), on their device."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.start = [_local(p).detach().clone() for p in self.params]
        self.start_sq = sum(float(s.double().pow(2).sum()) for s in self.start)

    @torch.no_grad()
    def __call__(self, dist) -> float:
        moved = sum(float((_local(p).double() - s.double()).pow(2).sum())
                    for p, s in zip(self.params, self.start))
        moved, start = dist.sum(moved).item(), dist.sum(self.start_sq).item()
        return math.sqrt(moved) / max(math.sqrt(start), 1e-30)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (FSDP2's DTensor), or the parameter itself."""
    return p.to_local() if hasattr(p, "to_local") else p


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


def step_metrics(b, results: list, means: dict, dist, *, skipped: bool, lam=None) -> dict:
    """An RL step's metrics from its Batch `b`, its updates' `results` (loss, grad_norm) and
    the losses' `means` (Metrics.means): each a mean over its own tokens or rows, over all
    ranks. `lam`: RLSD's lambda at this step."""
    n = dist.sum(len(b.examples)).item()  # rows over all ranks
    out = dict(means, loss=sum(r["loss"] for r in results) / len(results),
               grad_norm=sum(r["grad_norm"] for r in results) / len(results),
               skipped=float(skipped), tokens=dist.sum(b.mask.sum()).item(),
               updates=float(len(results)),
               reward_mean=dist.sum(b.rewards.sum()).item() / n,
               correct_frac=dist.sum(b.correct.float().sum()).item() / n,
               response_len_mean=dist.sum(b.resp_mask.sum()).item() / n,
               truncated_frac=dist.sum(b.truncated.sum()).item() / n)
    if lam is not None:
        out["rlsd_lambda"] = lam
    if b.distill is not None:  # the share of rows the distillation term acted on
        out["distilled_frac"] = dist.sum(b.distill.float().sum()).item() / n
    return out
