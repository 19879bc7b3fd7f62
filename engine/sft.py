"""Supervised fine-tuning: the toy warm start's step, or SFT on a dataset's solutions.

    sft_batch   prompts and their targets, laid out as a rollout batch (left-padded prompts,
                right-padded targets)
    sft_step    the token-mean negative log-likelihood of the targets, through the same
                hidden-state forward, chunked loss and global normaliser as the RL step
                (losses.backward_chunked), so it is resumable and split-invariant in the same
                way, then one clipped AdamW step

What a step's prompts and targets are (a dataset's solutions, or on an embedded task the mix
of demonstrations its warm start learns from) is engine/toy/demos.py. `python train.py --algo
sft` runs it; the toy warm start (engine/toy/warmstart.py) is such a run.
"""
import torch

from engine.batch import Batch
from engine.distributed import Dist
from engine.losses import LossOptions, Norms, backward_chunked
from engine.prompts import Prompts
from engine.rollout import left_pad
from engine.teachers import column_chunks
from engine.update import Metrics, clip_and_step, micro_batches

SFT = LossOptions(algo="sft")  # the token-mean NLL (losses.sft_chunk_loss)


def sft_batch(examples: list, texts: list[str], targets: list[str], tok, *, prompts: Prompts,
              dist: Dist) -> Batch:
    """Each example's prompt `texts[i]` (with the row's media) -> its target `targets[i]`, in
    the layout of a rollout batch, so SFT runs through the same hidden-state forward and
    chunked loss as RL."""
    prompt_ids = [prompts.ids(tok, t, ex=e) for e, t in zip(examples, texts)]
    target_ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                  for t in targets]
    ids, mask = left_pad(prompt_ids, tok.pad_token_id)
    n, T = len(examples), max(map(len, target_ids))
    resp = torch.full((n, T), tok.pad_token_id, dtype=torch.long)  # right-padded targets
    rmask = torch.zeros((n, T), dtype=torch.long)
    for i, t in enumerate(target_ids):
        resp[i, :len(t)], rmask[i, :len(t)] = torch.tensor(t), 1
    media = [prompts.media(tok, e) for e in examples]  # empty for a text row
    return Batch(examples, *(x.to(dist.device) for x in (ids, mask, resp, rmask)),
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
    norms = Norms(tokens=norm, rows=0.0, rows_x_len=0.0, distill_tokens=0.0)
    loss_sum = 0.0
    for mb in micro_batches(b, rows):
        ch = column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, logit_chunk)
        loss_sum += backward_chunked(model, mb, ch, norms=norms, opt=SFT, world=dist.world,
                                     metrics=Metrics())
    loss = dist.sum(loss_sum).item()
    grad_norm, skipped = clip_and_step(model, opt, loss=loss, lr=lr, max_grad_norm=max_grad_norm)
    return dict(loss=loss, grad_norm=grad_norm, skipped=float(skipped), tokens=norm)
