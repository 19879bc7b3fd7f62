"""The update machinery of a step: global normalisers, micro-batches, LM-head chunks, metrics,
the chunked backward, the learning rate, and the clipped optimizer step; then the RL update
of one mini-batch (`update_mini_batch`, steps 6-7 of train.train_step) built from them.

train.train_step (RL and distillation) and warmstart.sft_step (SFT) share all of it.
The one rule everything here keeps: a loss is a SUM over tokens divided by a GLOBAL count
(all micro-batches, all ranks), so splitting a batch into micro-batches, chunks of positions
or processes never changes the gradient.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch

import grpo
import losses
from batch import Batch
from config import Config
from distributed import Dist
from teachers import (chunked_logits, lm_head_logits, response_hidden,
                      sampled_token_logprobs)

@dataclass
class Norms:
    """Global denominators (all ranks, all micro-batches). Each micro-batch's loss is its sum
    divided by these, so the micro-batch gradients add up to the full batch's gradient, however
    the batch is split (STYLE §3; verl's batch_num_tokens, RLSD's `x world / total` rescale)."""
    tokens: float                # loss tokens: token-mean (DAPO Eq. 12, the RLSD code)
    rows: float                  # rows with a loss token: GRPO's per-sequence mean (Eq. 3)
    rows_x_len: float            # rows x max_new_tokens: Dr. GRPO's constant (Sec. 3.1)
    distill_tokens: float        # tokens of distilled rows: OPSD, SDPO, SRPO, the PTD term
    distill_rows: float = 0.0    # distilled rows with a loss token (--distill-agg seq-mean)
    w_mean: float | None = None  # SRPO: mean exp(-beta H_teacher) over its SDPO tokens


def global_norms(b: Batch, cfg: Config, dist: Dist) -> Norms:
    mask_NT = b.mask
    d_mask = mask_NT & b.distill[:, None] if b.distill is not None else mask_NT[:, :0]
    return Norms(tokens=dist.sum(mask_NT.sum()).item(),
                 rows=dist.sum((mask_NT.sum(1) > 0).sum()).item(),
                 rows_x_len=dist.sum(len(b.examples) * cfg.max_new_tokens).item(),
                 distill_tokens=dist.sum(d_mask.sum()).item(),
                 distill_rows=dist.sum((d_mask.sum(1) > 0).sum()).item())


def micro_batches(b: Batch, size: int) -> list:
    """Rows per forward/backward (0: all of this rank's rows). Groups may be split here: group
    statistics (advantages, siblings, routing) were computed on the whole batch already."""
    size = size or len(b.examples)
    return [b.select_rows(slice(i, i + size)) for i in range(0, len(b.examples), size)]


# Logits per LM-head chunk: 2**24 values are 64 MiB in float32, and the divergences make a few
# float32 copies of a chunk, so they stay at a few hundred MiB for any vocabulary. Measured on
# CPU: 2**23 gave a HIGHER peak RSS (glibc keeps 32 MiB blocks on its heap, which fragments;
# 64 MiB blocks are mmapped and returned when freed). A chunk also has a fixed cost of ~300
# tensor ops (`python bench.py --ops-per-chunk`), each a kernel launch on a GPU, so GPU chunks
# are 8x larger (reasoned from one H100 run, not yet timed; see BENCH.md). This is the chunk
# along positions; grpo.token_logprobs cuts each chunk again along rows (grpo.CHUNK_ELEMENTS).
LOGIT_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**27}


def column_chunks(rows: int, T: int, model, logit_chunk: int) -> list:
    """(t0, t1) ranges of response positions whose (rows, t1 - t0, V) logits hold about
    LOGIT_CHUNK_ELEMENTS values (logit_chunk > 0: that many positions; < 0: all at once).
    Every loss is a sum over positions divided by a global count (the per-sequence mean
    divides by the WHOLE row's length, Batch.row_tokens), so chunks add up exactly."""
    if logit_chunk < 0:
        return [(0, T)]
    head = model.get_output_embeddings().weight
    budget = LOGIT_CHUNK_ELEMENTS.get(head.device.type, LOGIT_CHUNK_ELEMENTS["cpu"])
    step = logit_chunk or max(1, budget // max(1, rows * head.shape[0]))
    return [(t, min(t + step, T)) for t in range(0, T, step)]


class Metrics:
    """Each metric as (sum, count) over its own tokens or rows, added up over chunks,
    micro-batches and ranks before dividing: a mean over exactly the tokens it is about."""

    def __init__(self):
        self.sums = {}

    def add(self, stats: dict):
        for k, (s, n) in stats.items():
            s0, n0 = self.sums.get(k, (0.0, 0.0))
            self.sums[k] = (s0 + s.double(), n0 + n.double())

    def means(self, dist: Dist) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)  # the same order on every rank
        totals = dist.sum(torch.stack([torch.stack(self.sums[k]) for k in keys])).tolist()
        return {k: s / max(n, 1.0) for k, (s, n) in zip(keys, totals)}


def backward_chunked(model, b: Batch, chunks: list, loss_fn, world: int, metrics: Metrics):
    """One micro-batch: the student's hidden states (one forward), `loss_fn(h, t0, t1) ->
    (loss, stats)` per chunk of positions, then one backward. Returns the loss (a float) and
    adds the stats to `metrics`.

    With several chunks, each runs under activation checkpointing: its (n, t, V) logits, and
    the teacher's, are recomputed in backward instead of stored, so memory holds one chunk's
    logits, never the whole (n, T, V)."""
    h_nTH = response_hidden(model, b.prompt_ids, b.prompt_mask, b.resp_ids, b.resp_mask,
                            **b.student_inputs(model))
    # one chunk (a small vocabulary): nothing to save by recomputing it in backward
    run = loss_fn if len(chunks) == 1 else partial(torch.utils.checkpoint.checkpoint, loss_fn,
                                                   use_reentrant=False)
    total = 0.0
    for t0, t1 in chunks:
        loss, stats = run(h_nTH[:, t0:t1], t0, t1)
        total = total + loss
        metrics.add(stats)  # returned by the forward call only, never by the recompute
    # FSDP averages gradients over ranks; our normalisers are already global: undo it
    (total * world).backward()
    return float(total.detach())


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate of optimizer step `step` (from 1): linear warm-up to --lr over
    --lr-warmup-steps, then constant, linear decay or cosine decay toward 0 at --steps. A
    function of the step alone, so a resumed run continues the schedule exactly."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.lr * step / cfg.lr_warmup_steps
    progress = (step - 1 - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def clip_and_step(model, opt, cfg: Config, loss: float, step: int):
    """Clip the (already synced) gradients and step, unless the loss or the norm is not finite:
    a NaN step would poison the weights for good. `loss` and the norm are global values, so
    every rank takes the same decision. Returns (grad_norm, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
    skipped = not (math.isfinite(norm) and math.isfinite(loss))
    if not skipped:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


# ----------------------------------------------------------------------------------------
# Steps 6-7 of the RL step (train.train_step): one optimizer update per mini-batch
# ----------------------------------------------------------------------------------------

def updates_per_step(cfg: Config) -> int:
    mini = cfg.mini_batch_size or cfg.prompts_per_step
    return cfg.ppo_epochs * (cfg.prompts_per_step // mini)


def rollout_mini_batches(b, cfg: Config, dist: Dist) -> list:
    """This rank's rows cut into --mini-batch-size prompts (over all ranks) per optimizer step,
    whole groups each (group statistics were computed on the whole batch already)."""
    if not cfg.mini_batch_size:
        return [b]
    rows = cfg.mini_batch_size // dist.world * cfg.group_size
    return [b.select_rows(slice(i, i + rows)) for i in range(0, len(b.examples), rows)]


def update_mini_batch(model, opt, teacher, b, cfg: Config, dist: Dist, step: int,
                      lam: float, metrics: Metrics, sw) -> dict:
    """Steps 6-7 for one mini-batch: the loss of each micro-batch, a chunk of positions at a
    time, backward, then one clipped AdamW step. Every normaliser is the mini-batch's count
    over all micro-batches and ranks (Norms), so the gradient does not depend on how the
    mini-batch is split. Returns {loss, grad_norm, skipped}."""
    T = cfg.temperature
    norms = global_norms(b, cfg, dist)  # all-reduced once: every micro-batch divides by them
    if b.distill is not None:  # --distill-agg as one weight per row, from the mini-batch's counts
        b.distill_w = losses.distill_row_weights(cfg.distill_agg, b, norms)
    mbs = micro_batches(b, cfg.micro_batch_size)
    chunks = [column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, cfg.logit_chunk)
              for mb in mbs]
    if cfg.algo == "srpo":  # pass 1 of its entropy-weight normaliser: a whole-batch mean
        with sw("teacher"):
            norms.w_mean = srpo_weight_mean(model, teacher, mbs, chunks, cfg, dist)
    if cfg.algo == "gspo" and b.old_logp is not None:  # each row's ratio, before its chunks
        with sw("teacher"):
            gspo_sequence_ratios(model, mbs, chunks, cfg)

    # 6. loss and backward, a micro-batch at a time and a chunk of positions at a time. The
    # gradients of the micro-batches accumulate in .grad; nothing is averaged per micro-batch,
    # because every loss is already divided by a global count (Norms)
    loss_sum = 0.0
    for mb, ch in zip(mbs, chunks):
        teacher_logits_at = None  # (t0, t1) -> the teacher's (n, t, V) logits of a chunk
        if cfg.algo in losses.DISTRIBUTION_TEACHER:  # the whole next-token distribution
            with sw("teacher"):
                teacher_logits_at = teacher.logits(model, mb.teacher_ids, mb.teacher_mask,
                                                   mb.resp_ids, mb.resp_mask,
                                                   **mb.teacher_inputs(model))

        # the student's logits and log-probs of one chunk, and its loss; under activation
        # checkpointing this runs again in backward, so the (n, t, V) logits are never stored
        def loss_fn(h_ntH, t0, t1, mb=mb, teacher_logits_at=teacher_logits_at):
            logits_ntV = lm_head_logits(model, h_ntH)
            c = mb.positions(t0, t1)
            logp_nt = grpo.token_logprobs(logits_ntV, c.resp_ids, temperature=T)
            t_ntV = teacher_logits_at(t0, t1) if teacher_logits_at else None
            return losses.chunk_loss(cfg, c, logits_ntV, logp_nt, t_ntV, norms, lam)

        with sw("fwd_bwd"):
            loss_sum += backward_chunked(model, mb, ch, loss_fn, dist.world, metrics)
    loss = dist.sum(loss_sum).item()  # the same global value on every rank

    # 7. update: clip the global gradient norm (after FSDP has reduced the gradients, so the
    # norm is the full model's), then AdamW; skipped if the loss or the norm is not finite
    with sw("optimizer"):
        grad_norm, skipped = clip_and_step(model, opt, cfg, loss, step)
    return dict(loss=loss, grad_norm=grad_norm, skipped=skipped)


@torch.no_grad()
def gspo_sequence_ratios(model, mbs: list, chunks: list, cfg: Config):
    """GSPO's log s_i of every row under the CURRENT weights (set on each micro-batch), one
    no-grad forward per micro-batch: the ratio is a mean over the whole sequence, and the loss
    sees one chunk of positions at a time. With one update per batch s_i = 1 (not called)."""
    for mb, ch in zip(mbs, chunks):
        logp = sampled_token_logprobs(chunked_logits(model, mb.prompt_ids, mb.prompt_mask,
                                                     mb.resp_ids, mb.resp_mask,
                                                     **mb.student_inputs(model)),
                                      mb.resp_ids, temperature=cfg.temperature, chunks=ch)
        mb.seq_log_ratio = grpo.sequence_log_ratio(logp, mb.old_logp, mb.resp_mask)


@torch.no_grad()
def srpo_weight_mean(model, teacher, mbs: list, chunks: list, cfg: Config,
                     dist: Dist) -> float:
    """Pass 1 of SRPO's two-pass normaliser: the mean of exp(-beta H_teacher) over every SDPO
    token of the batch (all ranks), so the weights have mean 1 over the whole batch (Sec. 3.2).
    It costs one more teacher forward per micro-batch: the teacher's hidden states are not
    kept from here to the loss, which would hold them for the whole batch at once."""
    total, count = 0.0, 0.0
    for mb, ch in zip(mbs, chunks):
        teacher_logits_at = teacher.logits(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids,
                                           mb.resp_mask, **mb.teacher_inputs(model))
        for t0, t1 in ch:
            s, n = losses.srpo_weight_sum(teacher_logits_at(t0, t1), mb.positions(t0, t1),
                                          srpo_beta=cfg.srpo_beta, temperature=cfg.temperature)
            total, count = total + s.item(), count + n.item()
    total, count = dist.sum(total).item(), dist.sum(count).item()
    return total / count if count else 1.0
