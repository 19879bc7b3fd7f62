"""A rollout batch: G sampled responses per prompt, their rewards, and the teachers' prompts.

Steps 1, 2 and 4 of a training step (train.train_step) are the functions here:
    sample           G responses per prompt with the KV cache, decoded, scored by the reward
                     function (rewards.py)
    dapo_resample    DAPO's dynamic sampling: re-roll the groups that are all right or all wrong
    teacher_prompts  the privileged prompt of each row: its student prompt plus the context its
                     teacher is shown (answer, solution, hint, rationale, or a correct sibling's
                     response), which the student's exact response ids then follow

Rows are laid out group by group: rows p*G .. p*G+G-1 are the G rollouts of prompt p, and a
group never straddles two ranks, so group statistics are computed on whole groups.
"""
import dataclasses
import re
from dataclasses import dataclass

import torch

import grpo
from engine import rewards as reward_fns, vision
from engine.distributed import gathered
from engine.prompts import Prompts
from engine.rollout import Rollouts, concat_rollouts, generate, left_pad, stop_ids

# The (N, T) fields: cut along T by `positions`; every tensor and list field is cut along N.
_POSITION_FIELDS = ("resp_ids", "resp_mask", "teacher_logp", "ref_logp", "old_logp",
                    "neg_logp")


@dataclass
class Batch:
    """One step's rows, filled in as the step goes (train.train_step's numbers):
        1-2 sample           examples .. in_loss, media: the rollouts and their rewards
        3   advantages       adv
        4   teacher prompts  teacher_ids, teacher_mask, has_context; distill, kl_off; CSD's
                             second teacher's prompt neg_ids, neg_mask
        5   scores           teacher_logp, ref_logp, old_logp, neg_logp (teachers.score_batch)
        6   per mini-batch   distill_w (losses.distill_row_weights), seq_log_ratio (GSPO)
            per chunk        row_tokens (Batch.positions keeps each row's whole count)
    A field is None until its stage (or when the algorithm has no use for it)."""
    examples: list                 # (N,) the Example behind each row (each prompt G times)
    prompt_ids: torch.Tensor       # (N, Lp) left-padded student prompts
    prompt_mask: torch.Tensor      # (N, Lp)
    resp_ids: torch.Tensor         # (N, T) sampled tokens, <eos> included, then padding
    resp_mask: torch.Tensor        # (N, T) 1 on sampled tokens up to and including <eos>
    truncated: torch.Tensor        # (N,) bool: no <eos> within max_new_tokens
    texts: list                    # (N,) decoded responses
    rewards: torch.Tensor          # (N,) reward scores (+ DAPO's overlong shaping)
    correct: torch.Tensor          # (N,) bool: the reward's verdict (its `acc`)
    in_loss: torch.Tensor          # (N,) bool: rows in the loss (DAPO drops groups still flat)
    adv: torch.Tensor | None = None            # (N,) group advantages          (step 3)
    teacher_ids: torch.Tensor | None = None    # (N, Lt) left-padded teacher prompts (step 4)
    teacher_mask: torch.Tensor | None = None   # (N, Lt)
    has_context: torch.Tensor | None = None    # (N,) bool: the teacher prompt has a context
    distill: torch.Tensor | None = None        # (N,) bool: rows the distillation term averages
    kl_off: torch.Tensor | None = None         # (N,) bool: PTD-PO rows without reference KL
    distill_w: torch.Tensor | None = None      # (N,) weight of each distilled row's token sum
    teacher_logp: torch.Tensor | None = None   # (N, T) teacher log-probs of the sampled tokens
    neg_ids: torch.Tensor | None = None        # (N, Ln) CSD: the prompt showing a wrong sibling
    neg_mask: torch.Tensor | None = None       # (N, Ln)
    neg_logp: torch.Tensor | None = None       # (N, T) CSD: that teacher's sampled-token log-probs
    ref_logp: torch.Tensor | None = None       # (N, T) KL-reference log-probs   (step 5)
    old_logp: torch.Tensor | None = None       # (N, T) rollout-policy log-probs (several updates)
    row_tokens: torch.Tensor | None = None     # (N,) loss tokens of each WHOLE row (positions)
    seq_log_ratio: torch.Tensor | None = None  # (N,) GSPO's log s_i under the current weights
    media: list | None = None                  # (N,) each row's processed media (vision.Media)

    @property
    def mask(self) -> torch.Tensor:
        """(N, T) bool: the tokens in the loss."""
        return self.resp_mask.bool() & self.in_loss[:, None]

    def student_inputs(self, model) -> dict:
        """Media and M-RoPE positions of a forward over prompt + response ({} for text)."""
        return vision.forward_inputs(model, self.media, self.prompt_ids, self.prompt_mask,
                                     self.resp_ids, self.resp_mask)

    def teacher_inputs(self, model) -> dict:
        """The same media, with the positions of the teacher's (longer) prompt."""
        return vision.forward_inputs(model, self.media, self.teacher_ids, self.teacher_mask,
                                     self.resp_ids, self.resp_mask)

    def select_rows(self, rows: slice) -> "Batch":
        """The same batch restricted to some rows (a micro-batch)."""
        def cut(x):
            return x[rows] if isinstance(x, (torch.Tensor, list)) else x
        return Batch(**{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def positions(self, t0: int, t1: int) -> "Batch":
        """The same rows, response positions t0:t1 only (a chunk of the LM-head work). Each
        row's whole token count is kept, for per-sequence means over chunks."""
        whole = self.row_tokens if self.row_tokens is not None else self.mask.sum(1)
        cols = {f: getattr(self, f)[:, t0:t1] for f in _POSITION_FIELDS
                if getattr(self, f) is not None}
        return dataclasses.replace(self, row_tokens=whole, **cols)

    def replace_rows(self, rows: list[int], new: "Batch", *, pad_id: int) -> "Batch":
        """A copy with `rows` replaced by the rows of `new` (a re-roll of those prompts); the
        response block is right-padded to the wider of the two."""
        T = max(self.resp_ids.shape[1], new.resp_ids.shape[1])

        def pad(x, value):
            return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

        resp, rmask = pad(self.resp_ids, pad_id), pad(self.resp_mask, 0)
        idx = torch.tensor(rows, device=resp.device)
        resp[idx], rmask[idx] = pad(new.resp_ids, pad_id), pad(new.resp_mask, 0)
        truncated, rewards = self.truncated.clone(), self.rewards.clone()
        correct = self.correct.clone()
        truncated[idx], rewards[idx.to(rewards.device)] = new.truncated, new.rewards
        correct[idx.to(correct.device)] = new.correct
        texts = list(self.texts)
        for j, i in enumerate(rows):
            texts[i] = new.texts[j]
        return dataclasses.replace(self, resp_ids=resp, resp_mask=rmask, truncated=truncated,
                                   rewards=rewards, correct=correct, texts=texts)


# ----------------------------------------------------------------------------------------
# Steps 1-2: sample and reward
# ----------------------------------------------------------------------------------------

def sample(model, tok, examples, *, prompts: Prompts, max_new_tokens: int, temperature: float,
           ignore_eos: bool, generation: str, overlong_cache: int, generator,
           device, top_k: int = 0, top_p: float = 1.0, reward=reward_fns.verifier,
           rows_per_pass: int = 0) -> Batch:
    """Sample one response per row (rows repeat each prompt G times) and reward it.

    The reward is `reward(response, answer, **row)` (default: the binary verifier, RLSD Eq. 1),
    plus DAPO's overlong penalty (Eq. 13) on the response length when `overlong_cache` > 0.
    `rows_per_pass` (--rollout-micro-batch) samples that many rows at a time, so the KV cache
    holds that many rows, not the whole batch (0: all at once)."""
    n = rows_per_pass or len(examples)
    media = [prompts.media(tok, e) for e in examples]  # empty for a text row
    parts = []
    with gathered(model):  # FSDP: unshard once for the whole generation, not per token
        for i in range(0, len(examples), n):
            ids, mask = left_pad([prompts.student(tok, e) for e in examples[i:i + n]],
                                 tok.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            # media: their pixels, features and positions in the prefill ({} for text)
            extra = vision.forward_inputs(model, media[i:i + n], ids, mask)
            parts.append(generate(model, ids, mask,
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  eos_id=-1 if ignore_eos else stop_ids(model, tok),
                                  pad_id=tok.pad_token_id, generator=generator, mode=generation,
                                  top_k=top_k, top_p=top_p,
                                  prefill_positions=extra.pop("position_ids", None),
                                  prefill_inputs=extra,
                                  banned_ids=vision.placeholder_ids(tok) if extra else None))
    ro: Rollouts = concat_rollouts(parts, tok.pad_token_id)
    texts = tok.batch_decode(torch.where(ro.resp_mask.bool(), ro.resp_ids, tok.pad_token_id),
                             skip_special_tokens=True)
    scores, accs = reward_fns.score(reward, texts, examples)
    rewards = torch.tensor(scores)
    if overlong_cache > 0:
        rewards = rewards + grpo.overlong_penalty(ro.resp_mask.sum(1).cpu(),
                                                  max_len=max_new_tokens, cache_len=overlong_cache)
    return Batch(examples, ro.prompt_ids, ro.prompt_mask, ro.resp_ids, ro.resp_mask, ro.truncated,
                 texts, rewards, torch.tensor(accs, dtype=torch.bool),
                 in_loss=torch.ones(len(examples), dtype=torch.bool),
                 media=media if any(media) else None)


def from_responses(tok, examples: list, rows: list, *, prompts: Prompts, device) -> Batch:
    """A Batch of given responses (replay.py's cached ones): `rows[i]` = (response ids with
    its end token, truncated, text, score, correct) of example i, each prompt as sample()
    encodes it."""
    ids, mask = left_pad([prompts.student(tok, e) for e in examples], tok.pad_token_id)
    T = max(1, max(len(r[0]) for r in rows))
    resp = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        resp[i, :len(r[0])], rmask[i, :len(r[0])] = torch.tensor(r[0], dtype=torch.long), 1
    media = [prompts.media(tok, e) for e in examples]
    return Batch(examples, ids.to(device), mask.to(device), resp.to(device), rmask.to(device),
                 torch.tensor([r[1] for r in rows]), [r[2] for r in rows],
                 torch.tensor([r[3] for r in rows]), torch.tensor([r[4] for r in rows]),
                 in_loss=torch.ones(len(rows), dtype=torch.bool),
                 media=media if any(media) else None)


def check_same_media(b: Batch, tok, passes: dict, dist) -> dict:
    """Every forward of a step must see the same media for a row: `passes` maps a pass (the
    rollout, the student's loss, the teacher, the reference) to the prompt ids it runs on, and
    each row's count of image, video and audio tokens must be the same in every pass and equal
    to what its media expand to (vision.expected_media_tokens). Otherwise the run stops at once,
    naming the row and the passes that differ (a public OmniOPSD replication rolled out without
    the audio its loss then saw). Returns each kind's mean tokens per row over all ranks (the
    metrics)."""
    want = vision.expected_media_tokens(tok, b.media or [None] * len(b.examples))
    seen = {name: vision.media_token_counts(tok, ids.cpu()) for name, ids in passes.items()}
    for kind in vision.MEDIA_KINDS:
        for name, counts in seen.items():
            bad = (counts[kind] != want[kind]).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                where = b.examples[i].where or f"row {i} ({b.examples[i].prompt[:40]!r})"
                per_pass = ", ".join(f"{n} {int(c[kind][i])}" for n, c in seen.items())
                raise SystemExit(f"error: {where}: the passes of this step see different "
                                 f"media: {kind} tokens: its media {int(want[kind][i])}, "
                                 f"{per_pass}; every forward of a row must see the same media")
    n = dist.sum(len(b.examples)).item()
    return {f"media_tokens_{k}": dist.sum(want[k].sum()).item() / n for k in vision.MEDIA_KINDS
            if dist.sum(want[k].sum()).item()}


def flat_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) values -> (P,) bool: groups whose values are all equal."""
    v_PG = values.view(-1, group_size)
    return (v_PG == v_PG[:, :1]).all(1)


def dapo_resample(b: Batch, resample, *, group_size: int, rounds: int, pad_id: int) -> Batch:
    """DAPO's dynamic sampling (Sec. 3.2): re-roll groups whose responses are all correct or
    all wrong. The test is on correctness, as verl's `filter_groups.metric=acc`, not on the
    shaped reward: all-wrong groups that differ only by the overlong penalty would otherwise
    be trained on length alone.

    Deviation from the paper: we re-roll the SAME prompts (up to `rounds` - 1 more times)
    instead of drawing new ones until the batch is full, so the data order stays a function
    of the step and every rank runs the same number of passes. Groups still flat afterwards
    are kept out of the loss (`in_loss`); they still run through the forward.
    `resample(examples)` samples and rewards those rows again."""
    for _ in range(rounds - 1):
        flat_P = flat_groups(b.correct, group_size)
        if not flat_P.any():
            break
        rows = flat_P.repeat_interleave(group_size).nonzero().squeeze(1).tolist()
        b = b.replace_rows(rows, resample([b.examples[i] for i in rows]), pad_id=pad_id)
    keep_N = ~flat_groups(b.correct, group_size).repeat_interleave(group_size)
    return dataclasses.replace(b, in_loss=keep_N.to(b.in_loss.device))


# ----------------------------------------------------------------------------------------
# Step 4: the teachers' prompts
# ----------------------------------------------------------------------------------------

def strip_thinking(text: str) -> str:
    """SDPO `remove_thinking_from_demonstration`: a sibling's <think>...</think> blocks (and
    the whitespace after them) are not shown; text around them is kept, as the official
    regular expression does."""
    return re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)


def unrelated_contexts(examples: list, pool: list, *, group_size: int, seed: int) -> list:
    """The study's control arm (`--context-source other`): each group's rows with the
    privileged fields (answer, solution, hint, rationale, teacher prompt) of a different,
    randomly chosen problem of `pool`, the question unchanged. All G rows of a group get the
    same donor, as they share a prompt. A generator of its own (seeded per step), so the
    sampling RNG, and so the rollouts, are those of the plain run."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(examples), group_size):
        e = examples[i]
        while True:  # a donor that is not the same problem (the toy pool repeats some)
            d = pool[torch.randint(len(pool), (1,), generator=g).item()]
            if (d.prompt, d.answer) != (e.prompt, e.answer) or len(pool) == 1:
                break
        swapped = dataclasses.replace(e, answer=d.answer, solution=d.solution, hint=d.hint,
                                      rationale=d.rationale, teacher_prompt=d.teacher_prompt)
        out += [swapped] * len(examples[i:i + group_size])
    return out


def teacher_prompts(tok, b: Batch, *, context: str, prompts: Prompts, device,
                    sibling: torch.Tensor | None = None, shown: list | None = None):
    """(ids (N, Lt), mask (N, Lt), has_context (N,) bool): each row's teacher prompt.

    context = answer | solution | hint | rationale: the row's own field (or its whole
    teacher-prompt column), when it has one; sibling (SDPO, SRPO): the response of row
    `sibling[i]` (the first correct sibling: distill.srpo_route; -1 for none), thinking
    removed; none (OPD): the student's own prompt. Rows with nothing to show get the plain
    student prompt and has_context False (prompts.Prompts.teacher). `shown`: the examples
    whose contexts the teacher sees instead (`unrelated_contexts`)."""
    siblings = [None] * len(b.examples)
    if context == "sibling":
        siblings = [strip_thinking(b.texts[s]) if s >= 0 else None for s in sibling.tolist()]
    rows = [prompts.teacher(tok, e, context, sibling=s)
            for e, s in zip(shown or b.examples, siblings)]
    ids, mask = left_pad([r[0] for r in rows], tok.pad_token_id)
    has = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    return ids.to(device), mask.to(device), has.to(device)
