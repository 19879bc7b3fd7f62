"""Scoring the student's response, and the teachers who score it.

Every algorithm here re-scores the tokens the student sampled; nobody but the student ever
generates. A row is a left-padded prompt followed by the response ids (see rollout.py), so
the positions that predict the response are the last T + 1 of one forward pass, whatever the
prompt: the student's own prompt, the KL reference's (the same), or a teacher's privileged
prompt (the student prompt plus an answer, a solution, a hint, a rationale or a sibling's
response). The G rows of a group repeat one prompt (and RLSD's, OPSD's and PTD-PO's teachers
one privileged prompt per group), so each distinct prompt runs once and its keys and values
are shared by its rows (`response_hidden`). What is read from such a forward:

    response_hidden         (N, T, H) the final hidden states, never (N, T, V) logits: the LM
                            head runs a chunk of positions at a time (`column_chunks`,
                            `lm_head_logits`), for the student's loss and for a teacher's
                            whole next-token distribution (OPSD, SDPO, SRPO, PTD-PO)
    sampled_token_logprobs  (N, T) log-probs of the sampled tokens, under no_grad, one
                            forward per micro-batch: all that RLSD's and OPD's teachers, the k3
                            KL reference and the rollout policy of several updates contribute

`Teacher` says whose weights do the scoring and how they move during training:
    live      the current student weights                        (OPSD/SDPO "current")
    frozen    a copy of the initial weights                      (OPSD, PTD-PO)
    sync      frozen copy, re-synced from the student every N    (RLSD, paper N = 10)
    ema       t <- (1 - a) t + a s after each optimizer step     (SDPO, SRPO, a = 0.05)
    trust     logits (1 - a) z_initial + a z_student             (SDPO trust region, Eq. 6)
    external  another model with the same tokenizer              (OPD)
"""
import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import distill
import grpo
from engine import vision
from engine.distributed import reshard, shard
from engine.lora import BaseView, is_lora
from engine.rollout import cache_argument, distinct_prompts, load_model, positions

TEACHER_MODES = ("none", "live", "frozen", "sync", "ema", "trust", "external")


# ----------------------------------------------------------------------------------------
# One forward over prompt + response: the hidden states of the response positions
# ----------------------------------------------------------------------------------------

def response_hidden(model, prompt_ids, prompt_mask, resp_ids, resp_mask, *, logits=False,
                    position_ids=None, **model_kwargs):
    """(N, T, H) final hidden states that predict each response token, from one forward over
    prompt + response; with logits=True the model's own (N, T, V) logits instead (tests and
    `check_logits` compare the chunked path with them).

    Only the last T + 1 positions are kept (`logits_to_keep`), so a long privileged prompt
    costs attention, not vocabulary-sized outputs. For the hidden states a forward pre-hook
    on the LM head takes its input (the last normed hidden states) and hands the head an empty
    slice, so a 150k-token vocabulary never becomes an (N, T, V) tensor; `lm_head_logits`
    applies the head a chunk of positions at a time. Position ids skip the left padding, so a
    row's numbers do not depend on how much padding its batch needed. A vision-language model
    gets its images and M-RoPE positions through `position_ids` and `model_kwargs` (vision.py).

    Rows that repeat a prompt (a group's G rows; U = N / G distinct prompts for a whole batch)
    share its forward: the U distinct prompts run once as a batch with a KV cache, the cache
    is indexed out to the N rows (`batch_select_indices`, a differentiable gather: in backward
    each prompt receives the gradient of all its rows), and the responses run on top of it; the
    prediction of the first response token is the last prompt position's. Every row sees the
    same keys, values and positions as in one plain forward, so the numbers agree to rounding
    (tested, with their gradients), and the prompt's share of the work drops by G. Not for
    images, nor under activation checkpointing with grad (a decoder layer recomputed in
    backward would append its keys to the cache a second time), nor for caches that are not
    plain keys and values (sliding window, linear attention): one plain forward then.
    """
    captured = {}

    def grab(module, args):  # the LM head's input, and an empty slice for the head itself
        captured["h"] = args[0]
        return (args[0][:, :0],) + tuple(args[1:])

    def read(out, keep: int):  # the last `keep` positions (a model that ignores
        return (out.logits if logits else captured["h"])[:, -keep:]  # logits_to_keep: Omni)

    handle = None if logits else model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        mask = torch.cat([prompt_mask, resp_mask], dim=1)
        pos = positions(mask) if position_ids is None else position_ids
        shared = (distinct_prompts(prompt_ids, prompt_mask)
                  if position_ids is None and not model_kwargs else None)
        cache = _shareable_cache(model) if shared is not None else None
        if cache is not None:  # each distinct prompt once, then every row's response on it
            (one_row, inverse), Lp, kv = shared, prompt_ids.shape[1], cache_argument(model)
            out = model(input_ids=prompt_ids[one_row], attention_mask=prompt_mask[one_row],
                        position_ids=pos[one_row, :Lp], use_cache=True, logits_to_keep=1,
                        **{kv: cache})
            first = read(out, 1)  # (U, 1, ...): the prediction of each prompt's first token
            cache.batch_select_indices(inverse)
            out = model(input_ids=resp_ids, attention_mask=mask, position_ids=pos[:, Lp:],
                        use_cache=True, logits_to_keep=resp_ids.shape[1], **{kv: cache})
            return torch.cat([first[inverse], read(out, resp_ids.shape[1])], dim=1)[:, :-1]
        out = model(input_ids=torch.cat([prompt_ids, resp_ids], dim=1), attention_mask=mask,
                    position_ids=pos, use_cache=False, logits_to_keep=resp_ids.shape[1] + 1,
                    **model_kwargs)
        # position t predicts token t + 1: the last T + 1 positions, the last prediction dropped
        return read(out, resp_ids.shape[1] + 1)[:, :-1]
    finally:
        if handle is not None:
            handle.remove()


def response_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask, **kwargs):
    """(N, T, V): the model's own logits of the response positions (`response_hidden`)."""
    return response_hidden(model, prompt_ids, prompt_mask, resp_ids, resp_mask, logits=True,
                           **kwargs)


def _shareable_cache(model):
    """An empty KV cache for a shared prompt forward, or None where sharing does not apply."""
    config = getattr(model, "config", None)  # None: not a transformers model
    if config is None or (_checkpointed(model) and torch.is_grad_enabled()):
        return None
    cache = DynamicCache(config=config)  # its layers follow the config's layer types
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window or linear-attention layers: the plain forward
    return cache


def _checkpointed(model) -> bool:
    """Are the decoder layers recomputed in backward (rollout.checkpoint_layers)?"""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


# ----------------------------------------------------------------------------------------
# The LM head a chunk of positions at a time
# ----------------------------------------------------------------------------------------

# Logits per LM-head chunk: 2**24 values are 64 MiB in float32, and the divergences make a few
# float32 copies of a chunk, so they stay at a few hundred MiB for any vocabulary. Measured on
# CPU: 2**23 gave a HIGHER peak RSS (glibc keeps 32 MiB blocks on its heap, which fragments;
# 64 MiB blocks are mmapped and returned when freed). A chunk also has a fixed cost of ~300
# tensor ops (`python tools/bench.py --ops-per-chunk`), each a kernel launch on a GPU, so GPU
# chunks are 8x larger (reasoned from one H100 run, not yet timed; see tools/BENCH.md). This is
# the chunk along positions; grpo.token_logprobs cuts each chunk again along rows.
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


# What a family does to its logits after the LM head, read from its config (the text config
# of a vision-language model), in the order the transformers models apply it
def _postprocess(config, z: torch.Tensor) -> torch.Tensor:
    if config is None:  # not a transformers model: its logits are lm_head(h)
        return z
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)  # Cohere, Cohere2: z * scale
    if scale is not None:
        z = z * scale
    divisor = getattr(text, "logits_scaling", None)  # Granite: z / logits_scaling
    if divisor is not None:
        z = z / divisor
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2 / 3: cap tanh(z / cap)
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for some final hidden states: (..., H) -> (..., V). The LM head (with
    its bias, if any), then the family's own post-processing (`_postprocess`): a logit scale
    (Cohere), a divisor (Granite), soft-capping (Gemma 2 / 3), exactly as its forward does."""
    head = model.get_output_embeddings()
    z = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None))
    return _postprocess(getattr(model, "config", None), z)


@torch.no_grad()
def sampled_token_logprobs(model, prompt_ids, prompt_mask, resp_ids, resp_mask, *,
                           temperature: float, rows: int = 0, logit_chunk: int = 0,
                           media: list | None = None, eos_ids: tuple = ()) -> torch.Tensor:
    """(N, T) float32 log softmax(z / temperature) of `model` at the sampled tokens, no grad:
    one forward per `rows` rows (0: all; the loss's micro-batches), then the LM head a chunk of
    positions at a time (the loss's own chunks, `column_chunks`, so the rollout policy's
    log-probs are exactly those its loss computes). `media`: each row's processed media
    (Batch.media), shown with these prompt ids (vision.forward_inputs). `eos_ids`: equivalent
    end tokens, one action (distill.merge_equivalent_ends)."""
    rows, parts = rows or len(prompt_ids), []
    for i in range(0, len(prompt_ids), rows):
        p, pm, r, rm = (x[i:i + rows] for x in (prompt_ids, prompt_mask, resp_ids, resp_mask))
        h_nTH = response_hidden(model, p, pm, r, rm, **vision.forward_inputs(
            model, media[i:i + rows] if media else None, p, pm, r, rm))
        ends = eos_ids if len(eos_ids) > 1 else ()  # one end id: nothing to merge
        parts.append(torch.cat([grpo.token_logprobs(
            distill.merge_equivalent_ends(lm_head_logits(model, h_nTH[:, t0:t1]), ends),
            distill.merge_end_tokens(r[:, t0:t1], ends), temperature=temperature)
            for t0, t1 in column_chunks(len(p), r.shape[1], model, logit_chunk)], dim=1))
    return torch.cat(parts)


def score_batch(b, model, teacher, ref, *, teacher_logp: bool, ref_logp: bool, old_logp: bool,
                temperature: float, rows: int, logit_chunk: int, eos_ids: tuple = ()):
    """Step 5 of a training step, without gradient: the log-probs of the sampled tokens of
    batch `b` under the teacher's privileged prompt (RLSD's evidence, OPD's advantage), under
    the KL reference and, when the batch is updated in several steps, under the rollout policy
    (the PPO ratio's "old" policy), as b.teacher_logp, b.ref_logp, b.old_logp (N, T). With one
    update per batch the old policy IS the current one: the loss uses its own log-probs,
    detached, and that pass is not needed. One forward per micro-batch of `rows` rows, the
    loss's own LM-head chunks, each row's media in every forward; with `eos_ids`, the
    equivalent end tokens as one action (distill.merge_equivalent_ends). CSD's second teacher
    (shown a wrong sibling) gives b.neg_logp."""
    kw = dict(temperature=temperature, rows=rows, logit_chunk=logit_chunk, media=b.media,
              eos_ids=eos_ids)
    if teacher_logp:  # the teacher's prompt, the same tokens; several teachers: each its rows
        b.teacher_logp = torch.zeros(b.resp_ids.shape, device=b.resp_ids.device)
        for scorer, rows in teacher.rows_of(model, b.examples):
            i = torch.tensor(rows, device=b.resp_ids.device)
            sub = dict(kw, media=[b.media[r] for r in rows] if b.media else None)
            b.teacher_logp[i] = sampled_token_logprobs(scorer, b.teacher_ids[i], b.teacher_mask[i],
                                                       b.resp_ids[i], b.resp_mask[i], **sub)
        if b.neg_ids is not None:
            b.neg_logp = sampled_token_logprobs(teacher.scorer(model), b.neg_ids, b.neg_mask,
                                                b.resp_ids, b.resp_mask, **kw)
    if ref_logp:
        b.ref_logp = sampled_token_logprobs(ref, b.prompt_ids, b.prompt_mask, b.resp_ids,
                                            b.resp_mask, **kw)
    if old_logp:  # before the first update
        b.old_logp = sampled_token_logprobs(model, b.prompt_ids, b.prompt_mask, b.resp_ids,
                                            b.resp_mask, **kw)


@torch.no_grad()
def check_logits(model, name: str):
    """Refuse a model whose forward computes logits some other way than `lm_head_logits` (a
    post-processing this project does not apply): one forward of a few tokens, the full
    logits against the chunked path's. Otherwise sampling (full logits) and the losses,
    entropies and log-probs (chunked) would silently disagree."""
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    device = model.get_output_embeddings().weight.device
    prompt = torch.randint(0, V, (1, 3), generator=g).to(device)
    resp = torch.randint(0, V, (1, 3), generator=g).to(device)
    ones = torch.ones_like(prompt)
    full = response_logits(model, prompt, ones, resp, ones).float()
    ours = lm_head_logits(model, response_hidden(model, prompt, ones, resp, ones)).float()
    err = (full - ours).abs().max().item()
    if err > 1e-3 * max(1.0, full.abs().max().item()):
        raise SystemExit(f"{name}: its logits differ from lm_head(hidden states) by up to "
                         f"{err:.3g} ({type(model).__name__} post-processes them in a way this "
                         f"project does not apply); its losses would not match its samples")


# ----------------------------------------------------------------------------------------
# Teachers: whose weights score the privileged prompt, and how they follow the student
# ----------------------------------------------------------------------------------------

class Teacher:
    """Who scores the privileged prompt. Never trained: every forward runs under no_grad and
    its parameters have requires_grad False. `model` is the teacher's own weights (frozen,
    sync, ema, trust: a copy of the initial student; external: another model); `live` scores
    with the student itself."""

    def __init__(self, mode: str, model=None, *, sync_every: int = 0, ema_rate: float = 0.0,
                 by_name: dict | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode {mode!r}: expected one of {TEACHER_MODES}")
        if (mode not in ("none", "live")) != (model is not None):
            raise ValueError(f"teacher mode {mode!r} {'needs' if model is None else 'takes no'} model")
        self.mode, self.model = mode, model
        self.by_name = by_name or {}  # several external teachers: name -> model (model: the first)
        for m in self.by_name.values():
            m.eval().requires_grad_(False)
        self.sync_every = sync_every  # sync: copy the student every N optimizer steps
        self.ema_rate = ema_rate      # ema: the EMA rate; trust: the student's share of the logits
        if isinstance(model, torch.nn.Module):  # not lora.BaseView: the student's own base
            model.eval().requires_grad_(False)

    def scorer(self, student):
        """The model whose sampled-token log-probs are the teacher's (RLSD, OPD): its own
        weights, or the student's for `live`. (`trust` mixes two models' logits, which only
        the whole-distribution losses read: config.py refuses it for RLSD and OPD.)"""
        if self.mode == "trust":
            raise ValueError("a trust-region teacher mixes two models' logits: use hidden()")
        return student if self.mode == "live" else self.model

    def rows_of(self, student, examples: list) -> list:
        """[(model, row indices)]: who scores which rows. One teacher scores all of them; with
        several external teachers each scores the rows whose `teacher` names it (rows that
        name none: the first)."""
        if len(self.by_name) < 2:
            return [(self.scorer(student), list(range(len(examples))))]
        first = next(iter(self.by_name))
        rows = {}
        for i, e in enumerate(examples):
            rows.setdefault(e.teacher or first, []).append(i)
        return [(self.by_name[name], idx) for name, idx in rows.items()]

    @torch.no_grad()
    def hidden(self, student, prompt_ids, prompt_mask, resp_ids, resp_mask, **model_kwargs):
        """The teacher's (n, T, H) hidden states of the response positions, as a tuple: one
        tensor, or for `trust` its own and the student's. `model_kwargs`: a vision-language
        row's media and positions (vision.forward_inputs)."""
        own = response_hidden(student if self.mode == "live" else self.model, prompt_ids,
                              prompt_mask, resp_ids, resp_mask, **model_kwargs)
        if self.mode != "trust":
            return (own,)
        return own, response_hidden(student, prompt_ids, prompt_mask, resp_ids, resp_mask,
                                    **model_kwargs)

    @torch.no_grad()
    def logits(self, student, hidden: tuple, t0: int, t1: int) -> torch.Tensor:
        """The teacher's (n, t1 - t0, V) logits of positions t0:t1, from `hidden`."""
        own = lm_head_logits(student if self.mode == "live" else self.model, hidden[0][:, t0:t1])
        if self.mode != "trust":
            return own
        # SDPO Eq. 6: the softmax of the lerped logits is the normalised geometric mixture
        return distill.trust_region_logits(own, lm_head_logits(student, hidden[1][:, t0:t1]),
                                           self.ema_rate)

    @torch.no_grad()
    def update(self, student, step: int, *, skipped: bool = False):
        """After optimizer step `step` (counted from 1): sync or EMA toward the student.

        A sync is due by the step count alone, so it happens even when this step's update was
        skipped (non-finite), as in the RLSD trainer (docs/fidelity.md F17); the EMA moves only after an
        update that was taken, as SDPO's `_update_teacher` does."""
        sync = self.mode == "sync" and self.sync_every > 0 and step % self.sync_every == 0
        ema = self.mode == "ema" and not skipped
        if sync or ema:
            reshard(self.model, student)  # FSDP: both sharded alike, parameter by parameter
        if sync:
            for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
                t.copy_(s)
        elif ema:
            distill.ema_update(self.model.parameters(), student.parameters(), self.ema_rate)

    @property
    def has_state(self) -> bool:
        """Weights that neither the student nor the initial model can restore (checkpointed)."""
        return self.mode in ("sync", "ema")


def teacher_and_reference(model, *, mode: str, kl_coef: float, sync_every: int,
                          ema_rate: float, dist, dtype, external=None, also=None):
    """(Teacher, KL reference or None), and the student sharded with them under torchrun.

    The teacher's own weights (frozen, sync, ema, trust) and the reference are copies of the
    initial student; `external` is OPD's other model. The reference is never the same object
    as a teacher that moves (sync, EMA; docs/fidelity.md F10): then it gets a copy of its own. With LoRA
    the initial student is the student with its adapters off (lora.BaseView), so a frozen or
    trust-region teacher and the reference cost no copy at all. Sharding computes in `dtype`
    (bf16 compute, float32 master weights: FSDP's mixed precision). `also`: another copy of
    the student to shard like it (--rollout-refresh's rollout policy)."""
    # copies are made BEFORE sharding: each copy is then sharded like the student, so a sync or
    # an EMA update is a parameter-by-parameter operation between identically sharded models
    base = BaseView(model) if is_lora(model) else None
    moving = mode in ("sync", "ema")  # teachers whose weights leave theta_0
    by_name = external if isinstance(external, dict) else {}  # several: name -> model
    external = next(iter(by_name.values())) if by_name else external
    initial = external
    if mode in ("frozen", "trust", "sync", "ema"):
        initial = copy.deepcopy(model) if (moving or base is None) else base
    ref = None
    if kl_coef > 0:
        # a frozen teacher IS the initial model, so the reference may share its weights; a
        # sync or EMA teacher moves away from it, and the KL must stay anchored at theta_0
        if base is not None:
            ref = base
        else:
            ref = initial if (initial is not None and not moving and initial is not external) \
                else copy.deepcopy(model)
    modules = [x for x in (model, initial, ref, also, *by_name.values())
               if isinstance(x, torch.nn.Module)]
    for m in {id(x): x for x in modules}.values():  # each once
        shard(m, dist, dtype)
    return Teacher(mode, initial, sync_every=sync_every, ema_rate=ema_rate,
                   by_name=by_name), ref


def check_student(model, tok, examples: list, *, audio_in_video: bool, source: str):
    """The student's logits are lm_head(hidden states), so its losses and samples agree
    (`check_logits`), and it reads the rows' media (audio needs an audio tower, images a vision
    one: vision.check_model). One message naming `source` otherwise."""
    check_logits(model, source)
    try:
        vision.check_model(tok, examples, audio_in_video=audio_in_video, source=source)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def teacher_specs(spec: str) -> list:
    """[(name, path)] of --teacher (repeated flags arrive comma-joined): NAME=PATH, or a bare
    PATH named by itself. The first is the default teacher."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, path = item.rpartition("=") if "=" in item else (item, "", item)
        out.append((name or path, path))
    return out


def check_row_teachers(examples: list, names: list, key: str):
    """Every row that names a teacher (data column `key`) names one of --teacher's."""
    for e in examples:
        if e.teacher and e.teacher not in names:
            raise SystemExit(f"error: {e.where or 'a row'}: {key} {e.teacher!r} is not a "
                             f"--teacher name ({', '.join(names)})")


def external_teacher(path: str, tok, *, flag: str, device):
    """OPD's external teacher: the model at `path`, checked like the student (`check_logits`)
    and refused unless it shares the student's vocabulary (`flag`: how the user named it)."""
    model, t_tok = load_model(path, device=device)
    check_logits(model, flag)
    if len(t_tok) != len(tok):
        raise SystemExit(f"{flag}: vocabulary of {len(t_tok)} tokens, the student has "
                         f"{len(tok)}; OPD needs a shared tokenizer")
    return model
