"""Supervised fine-tuning: the toy warm start's step, or SFT on a dataset's solutions.

    sft_batch   prompts and their targets, laid out as a rollout batch (left-padded prompts,
                right-padded targets); on an embedded task the careless demonstrator's
    sft_step    the token-mean negative log-likelihood of the targets, through the same
                hidden-state forward, chunked loss and global normaliser as the RL step
                (losses.backward_chunked), so it is resumable and split-invariant in the same
                way, then one clipped AdamW step

`python train.py --algo sft` runs it; the toy warm start (engine/toy/warmstart.py) is such a run.
"""
import random

import torch

import data
import grpo
from engine.batch import Batch
from engine.distributed import Dist
from engine.losses import backward_chunked
from engine.prompts import Prompts, render, templates
from engine.rollout import left_pad
from engine.teachers import column_chunks
from engine.toy import arithmetic, clips, shapes
from engine.update import Metrics, clip_and_step, micro_batches

# the toy warm start: 30% of its prompts carry the answer, so that the same network later
# acts as a teacher that USES a privileged context (30%, not 20%: measured). Without a context
# the demonstrations drop 80% of the carries (--demo-slip, arithmetic.sloppy_solution); in a
# trial run 0.6 left the warm start nearer to where RL levels off, so less for RL to fix. On
# the shapes task the demonstrator overlooks that share of the right-hand column's shapes; on
# the clips task it counts that share of the silent seconds (it does not listen).
TOY_SFT_MIX = ["student"] * 4 + ["answer"] * 3 + ["solution", "hint", "rationale"]


def sft_batch(examples, step: int, tok, *, prompts: Prompts, data_spec: str, per_step: int,
              seed: int, slip: float, dist: Dist) -> Batch:
    """Prompt -> reference solution (or the answer). On an embedded task the prompts mix in
    every privileged context (TOY_SFT_MIX), so that the network learns to read them, and the
    targets of the bare questions are the careless demonstrator's (`slip`, --demo-slip)."""
    # the same data order as RL: a function of (seed, step), so the warm start resumes exactly
    exs = data.step_examples(examples, step, prompts_per_step=per_step, seed=seed,
                             rank=dist.rank, world=dist.world)
    rng = random.Random(f"{seed}-{step}-{dist.rank}")  # a string seed: stable across runs
    tpl, P = templates(data_spec), prompts
    toy = data_spec in data.TASKS
    prompt_ids, targets = [], []
    for e in exs:
        kind = rng.choice(TOY_SFT_MIX) if toy else "student"
        kind = kind if kind == "student" or getattr(e, kind) else "student"  # e.g. no hint
        prompt_ids.append(P.ids(tok, render(tpl[kind], e), ex=e))  # with the row's media
        target = e.solution or e.answer  # the worked solution; a bare answer if there is none
        if toy and kind == "student":  # the demonstrator slips without a context
            careless = {"shapes": shapes.careless_solution, "clips": clips.careless_solution}
            target = careless.get(data_spec, arithmetic.sloppy_solution)(e, rng, slip)
        targets.append(tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    # the same layout as a rollout batch (left-padded prompts, right-padded targets), so SFT
    # runs through the same hidden-state forward and chunked loss as RL
    ids, mask = left_pad(prompt_ids, tok.pad_token_id)
    n, T = len(exs), max(map(len, targets))
    resp = torch.full((n, T), tok.pad_token_id, dtype=torch.long)  # right-padded targets
    rmask = torch.zeros((n, T), dtype=torch.long)
    for i, t in enumerate(targets):
        resp[i, :len(t)], rmask[i, :len(t)] = torch.tensor(t), 1
    media = [P.media(tok, e) for e in exs]  # empty for a text row
    return Batch(exs, *(x.to(dist.device) for x in (ids, mask, resp, rmask)),
                 truncated=torch.zeros(n, dtype=torch.bool), texts=[], rewards=torch.zeros(n),
                 correct=torch.zeros(n, dtype=torch.bool),
                 in_loss=torch.ones(n, dtype=torch.bool, device=dist.device),
                 media=media if any(media) else None)


def sft_step(model, opt, b: Batch, *, rows: int, logit_chunk: int, lr: float,
             max_grad_norm: float, dist: Dist) -> dict:
    """Token-mean negative log-likelihood of the targets, with the same chunked scaffold:
    `rows` per micro-batch (--micro-batch-size), then one clipped AdamW step at `lr`."""
    model.train()
    # a token-mean over ALL target tokens of the step (all ranks): micro-batches and ranks
    # then add up to the full batch's gradient, as in the RL step
    norm = dist.sum(b.mask.sum()).item()

    def nll(c, logits, logp, teacher_logits):
        return grpo.aggregate(-logp, c.mask, normalizer=norm), {}

    loss_sum = 0.0
    for mb in micro_batches(b, rows):
        ch = column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, logit_chunk)
        loss_sum += backward_chunked(model, mb, ch, nll, world=dist.world, metrics=Metrics())
    loss = dist.sum(loss_sum).item()
    grad_norm, skipped = clip_and_step(model, opt, loss=loss, lr=lr, max_grad_norm=max_grad_norm)
    return dict(loss=loss, grad_norm=grad_norm, skipped=float(skipped), tokens=norm)
