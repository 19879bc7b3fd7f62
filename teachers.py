"""Scoring the student's response, and the teachers who score it.

Every algorithm here re-scores the tokens the student sampled; nobody but the student ever
generates. A row is a left-padded prompt followed by the response ids (see rollout.py), so
the positions that predict the response are the last T + 1 of one forward pass, whatever the
prompt: the student's own prompt, the KL reference's (the same), or a teacher's privileged
prompt (the student prompt plus an answer, a solution, a hint, a rationale or a sibling's
response). The G rows of a group repeat one prompt (and RLSD's, OPSD's and PTD-PO's teachers
one privileged prompt per group), so each distinct prompt runs once and its keys and values
are shared by its rows (`shared_prompt_forward`). Two things are read from such a forward:

    sampled_token_logprobs  (N, T) log-probs of the sampled tokens, under no_grad. All that
                            RLSD's and OPD's teachers and the k3 KL reference contribute.
    chunked_logits          a function (t0, t1) -> (n, t1 - t0, V) logits of those positions,
                            for the losses that compare whole distributions (OPSD, SDPO,
                            SRPO, PTD-PO). The teacher's hidden states are computed once; its
                            LM head runs per chunk, so (N, T, V) logits never exist at once.

`Teacher` says whose weights do the scoring and how they move during training:
    live      the current student weights                        (OPSD/SDPO "current")
    frozen    a copy of the initial weights                      (OPSD, PTD-PO)
    sync      frozen copy, re-synced from the student every N    (RLSD, paper N = 10)
    ema       t <- (1 - a) t + a s after each optimizer step     (SDPO, SRPO, a = 0.05)
    trust     logits (1 - a) z_initial + a z_student             (SDPO trust region, Eq. 6)
    external  another model with the same tokenizer              (OPD)
"""
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import distill
import grpo
from distributed import reshard
from rollout import cache_argument, distinct_prompts, positions

TEACHER_MODES = ("none", "live", "frozen", "sync", "ema", "trust", "external")


# ----------------------------------------------------------------------------------------
# One forward over prompt + response: logits or hidden states of the response positions
# ----------------------------------------------------------------------------------------

def response_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask, *, position_ids=None,
                    **model_kwargs):
    """(N, T, V) logits that predict each response token, from one forward over prompt+response.

    Only the last T + 1 positions go through the LM head (`logits_to_keep`), so a long
    privileged prompt costs attention, not vocabulary-sized logits. Position ids skip the left
    padding, so a row's numbers do not depend on how much padding its batch needed. A
    vision-language model gets its images and M-RoPE positions through `position_ids` and
    `model_kwargs` (vision.py). Rows that share a prompt share its forward
    (`shared_prompt_forward`, rollout.SHARE_PROMPTS), which gives the same numbers.
    """
    return _response_forward(model, prompt_ids, prompt_mask, resp_ids, resp_mask,
                             lambda out: out.logits, position_ids=position_ids, **model_kwargs)


def _response_forward(model, prompt_ids, prompt_mask, resp_ids, resp_mask, read, *,
                      position_ids=None, **model_kwargs):
    """`read(output)` at the T + 1 positions that predict the response (and its end), last
    dropped: (N, T, ...). `read` is called right after each forward of the model."""
    if position_ids is None and not model_kwargs:
        shared = shared_prompt_forward(model, prompt_ids, prompt_mask, resp_ids, resp_mask, read)
        if shared is not None:
            return shared
    ids = torch.cat([prompt_ids, resp_ids], dim=1)
    mask = torch.cat([prompt_mask, resp_mask], dim=1)
    out = model(input_ids=ids, attention_mask=mask,
                position_ids=positions(mask) if position_ids is None else position_ids,
                use_cache=False, logits_to_keep=resp_ids.shape[1] + 1, **model_kwargs)
    return read(out)[:, :-1]  # position t predicts token t + 1: drop the last prediction


def shared_prompt_forward(model, prompt_ids, prompt_mask, resp_ids, resp_mask, read):
    """The forward of `_response_forward` with each distinct prompt computed once, or None where
    that does not apply (no prompt repeats; layers recomputed in backward; a cache that is not
    plain keys and values).

    The U distinct prompts (of N rows; U = N / G for a whole batch of groups) run as one batch
    with a KV cache; the cache is then indexed out to the N rows (`batch_select_indices`, a
    differentiable gather: in backward each prompt receives the gradient of all its rows), and
    the responses run on top of it. The prediction of the first response token is the last
    prompt position's, from the first forward. Every row sees the same keys, values and
    positions as in the plain forward, so the numbers agree to rounding (tested, with their
    gradients); the prompt's share of the work drops by G.

    Not under activation checkpointing with grad: a decoder layer recomputed in backward would
    append its keys to the cache a second time (under no_grad nothing is recomputed).
    """
    shared = distinct_prompts(prompt_ids, prompt_mask)
    config = getattr(model, "config", None)  # None: not a transformers model
    if shared is None or config is None or (_checkpointed(model) and torch.is_grad_enabled()):
        return None
    cache = DynamicCache(config=config)  # its layers follow the config's layer types
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window or linear-attention layers: the plain forward
    (one_row, inverse), Lp = shared, prompt_ids.shape[1]
    mask = torch.cat([prompt_mask, resp_mask], dim=1)
    pos = positions(mask)
    kv = cache_argument(model)
    out = model(input_ids=prompt_ids[one_row], attention_mask=prompt_mask[one_row],
                position_ids=pos[one_row, :Lp], use_cache=True, logits_to_keep=1, **{kv: cache})
    first = read(out)  # (U, 1, ...): the prediction of each prompt's first response token
    cache.batch_select_indices(inverse)
    out = model(input_ids=resp_ids, attention_mask=mask, position_ids=pos[:, Lp:],
                use_cache=True, logits_to_keep=resp_ids.shape[1], **{kv: cache})
    return torch.cat([first[inverse], read(out)], dim=1)[:, :-1]


def _checkpointed(model) -> bool:
    """Are the decoder layers recomputed in backward (rollout.checkpoint_layers)?"""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def response_hidden(model, prompt_ids, prompt_mask, resp_ids, resp_mask, **model_kwargs):
    """(N, T, H) final hidden states that predict each response token, and no logits at all.

    The same forward as `response_logits`, but a forward pre-hook on the LM head takes its
    input (the last normed hidden states) and hands the head an empty slice instead, so a
    150k-token vocabulary never becomes an (N, T, V) tensor. Callers apply `lm_head_logits`
    a chunk of positions at a time. The head's input is taken, so a scale applied to the
    hidden states before the head is included; what a family applies after it is redone by
    `lm_head_logits` (`check_logits` refuses a model where that does not match).
    """
    captured = {}

    def grab(module, args):
        captured["h"] = args[0]
        return (args[0][:, :0],) + tuple(args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        return _response_forward(model, prompt_ids, prompt_mask, resp_ids, resp_mask,
                                 lambda out: captured["h"], **model_kwargs)
    finally:
        handle.remove()


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
    ours = chunked_logits(model, prompt, ones, resp, ones)(0, 3).float()
    err = (full - ours).abs().max().item()
    if err > 1e-3 * max(1.0, full.abs().max().item()):
        raise SystemExit(f"{name}: its logits differ from lm_head(hidden states) by up to "
                         f"{err:.3g} ({type(model).__name__} post-processes them in a way this "
                         f"project does not apply); its losses would not match its samples")


@torch.no_grad()
def chunked_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask, **model_kwargs):
    """A function (t0, t1) -> (n, t1 - t0, V) logits for response positions t0:t1, no grad.

    The hidden states come from one forward here; each call applies only the LM head."""
    h_nTH = response_hidden(model, prompt_ids, prompt_mask, resp_ids, resp_mask, **model_kwargs)

    def logits(t0: int, t1: int) -> torch.Tensor:
        with torch.no_grad():  # also when called from inside the student's loss
            return lm_head_logits(model, h_nTH[:, t0:t1])
    return logits


@torch.no_grad()
def sampled_token_logprobs(logits_fn, resp_ids, *, temperature: float, chunks) -> torch.Tensor:
    """(n, T) float32 log softmax(z / temperature) at the sampled tokens, from a `chunked_logits`
    function, a chunk of positions at a time (`chunks`: the (t0, t1) ranges the loss uses, so
    each chunk's numbers are exactly those the loss would have computed)."""
    return torch.cat([grpo.token_logprobs(logits_fn(t0, t1), resp_ids[:, t0:t1],
                                          temperature=temperature) for t0, t1 in chunks], dim=1)


# ----------------------------------------------------------------------------------------
# Teachers: whose weights score the privileged prompt, and how they follow the student
# ----------------------------------------------------------------------------------------

class Teacher:
    """Who scores the privileged prompt. Never trained: every forward runs under no_grad and
    its parameters have requires_grad False. `model` is the teacher's own weights (frozen,
    sync, ema, trust: a copy of the initial student; external: another model); `live` scores
    with the student itself."""

    def __init__(self, mode: str, model=None, *, sync_every: int = 0, ema_rate: float = 0.0):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode {mode!r}: expected one of {TEACHER_MODES}")
        if (mode not in ("none", "live")) != (model is not None):
            raise ValueError(f"teacher mode {mode!r} {'needs' if model is None else 'takes no'} model")
        self.mode, self.model = mode, model
        self.sync_every = sync_every  # sync: copy the student every N optimizer steps
        self.ema_rate = ema_rate      # ema: the EMA rate; trust: the student's share of the logits
        if isinstance(model, torch.nn.Module):  # not lora.BaseView: the student's own base
            model.eval().requires_grad_(False)

    def logits(self, student, prompt_ids, prompt_mask, resp_ids, resp_mask, **model_kwargs):
        """A function (t0, t1) -> the teacher's (n, t1 - t0, V) logits of those positions.
        `model_kwargs`: a vision-language row's images and positions (vision.forward_inputs)."""
        own = chunked_logits(student if self.mode == "live" else self.model,
                             prompt_ids, prompt_mask, resp_ids, resp_mask, **model_kwargs)
        if self.mode != "trust":
            return own
        current = chunked_logits(student, prompt_ids, prompt_mask, resp_ids, resp_mask,
                                 **model_kwargs)
        # SDPO Eq. 6: the softmax of the lerped logits is the normalised geometric mixture
        return lambda t0, t1: distill.trust_region_logits(own(t0, t1), current(t0, t1),
                                                          self.ema_rate)

    @torch.no_grad()
    def update(self, student, step: int, *, skipped: bool = False):
        """After optimizer step `step` (counted from 1): sync or EMA toward the student.

        A sync is due by the step count alone, so it happens even when this step's update was
        skipped (non-finite), as in the RLSD trainer (audit F17); the EMA moves only after an
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
