"""Models and rollouts: loading (one place), activation checkpointing, sampling.

A rollout batch is a left-padded prompt block followed by a right-padded response block:

    prompt_ids   (N, Lp)   <pad><pad> Q 7 + 5 - 3 \n :
    resp_ids     (N, T)    7 + 5 = 1 2 ; 1 2 - 3 = 9 <eos> <pad> <pad>

Because every response starts at column Lp, the logits predicting the response are the last
T + 1 positions of the forward pass (`logits_to_keep`), for the student and for any teacher
whose prompt (the student prompt plus a privileged context) is concatenated with the SAME
response ids. Teachers therefore score exactly the tokens the student sampled
(teachers.py does that scoring). The G rows of a group repeat one prompt, whose prefill runs
once (`distinct_prompts`).
"""
import inspect
import os
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer

from engine import lora, vision

def checkpoint_layers(model):
    """Activation checkpointing of every decoder layer: its activations are recomputed in
    backward instead of stored (non-reentrant, so it composes with FSDP2 and with the chunked
    LM head, whose own checkpointing is losses.backward_chunked's)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(path: str, *, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a local HF directory or a hub id, the same code path for both.
    A LoRA checkpoint (a PEFT adapter directory) loads as its base with the adapters merged.
    Every loader runs with trust_remote_code=False: a directory whose config names its own
    Python code (auto_map) is refused with one message, its code never run."""
    try:
        return _load_model(path, dtype=dtype, device=device)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise SystemExit(refuse_remote_code(path)) from None


def refuse_remote_code(path: str) -> str:
    return (f"error: {path}: this model needs Python code of its own (auto_map in its "
            f"config.json), and this project never runs code from a model directory; use a "
            f"model of a family transformers implements")


def _load_model(path: str, *, dtype, device):
    if os.path.isdir(path) and not any(
            os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: model directory has no tokenizer "
                                f"(tokenizer.json / tokenizer_config.json)")
    transformers.logging.disable_progress_bar()  # one console line per step, not per load
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:  # many base models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if os.path.isdir(path) and lora.is_adapter_dir(path):
        model = lora.load_merged(path, partial(load_model, dtype=dtype))
        if vision.is_vision_language(model.config):  # the processors, saved beside it
            vision.attach_processors(tokenizer, path, model.config)
    elif vision.is_vision_language(path):  # image-text-to-text: the tokenizer carries the
        model, tokenizer = vision.load(path, dtype=dtype)  # image processor (vision.py)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    return model.to(device), tokenizer


def end_ids(spec: str, model, tokenizer) -> tuple:
    """The equivalent end-of-sequence ids of --eos-ids ('1,2'), or by default every end id
    the tokenizer and generation config declare (`stop_ids`)."""
    given = tuple(dict.fromkeys(int(x) for x in spec.split(",") if x.strip()))
    return given or tuple(stop_ids(model, tokenizer))


def stop_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id: the tokenizer's and all of the model's generation config (Qwen3
    lists both <|im_end|> and <|endoftext|>), as vLLM stops on (docs/fidelity.md F15)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------
# Batches of token ids
# ----------------------------------------------------------------------------------------

def left_pad(seqs: list[list[int]], pad_id: int):
    """Ragged prompts -> (ids (N, L), mask (N, L)) padded on the left, so all end together."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token is position 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# The G rows of a group share one prompt: it goes through the model once and the G rows read
# its keys and values, in the rollout's prefill (`generate`) and in every scoring forward
# (teachers.response_hidden). False: each row's prompt runs again, e.g. to measure what
# sharing saves (tools/bench.py --share-prompts 0).
SHARE_PROMPTS = True


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(one_row, inverse) where some rows repeat a prompt, else None: one_row (U,) is a row of
    each of the U distinct prompts, inverse (N,) the distinct prompt of each row, so
    prompt_ids[one_row][inverse] == prompt_ids."""
    if not SHARE_PROMPTS:
        return None
    distinct, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0,
                                     return_inverse=True)
    U, N = len(distinct), len(inverse)
    if U == N:
        return None
    one_row = inverse.new_empty(U).scatter_(0, inverse, torch.arange(N, device=inverse.device))
    return one_row, inverse


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor   # (N, Lp) left-padded student prompts
    prompt_mask: torch.Tensor
    resp_ids: torch.Tensor     # (N, T) sampled tokens, <eos> included, then padding
    resp_mask: torch.Tensor    # (N, T) 1 on sampled tokens up to and including <eos>
    truncated: torch.Tensor    # (N,) bool: no <eos> within max_new_tokens
    media: list | None = None  # (N,) each row's processed media, when the caller keeps them


def concat_rollouts(parts: list, pad_id: int) -> Rollouts:
    """Rollouts sampled in several passes as one batch: prompts left-padded and responses
    right-padded to the widest part. Position ids skip padding, so no row's numbers change."""
    if len(parts) == 1:
        return parts[0]
    Lp = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.resp_ids.shape[1] for p in parts)

    def cat(name, width, value, left):
        xs = [getattr(p, name) for p in parts]
        return torch.cat([torch.nn.functional.pad(
            x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]), value=value)
            for x in xs])
    return Rollouts(cat("prompt_ids", Lp, pad_id, True), cat("prompt_mask", Lp, 0, True),
                    cat("resp_ids", T, pad_id, False), cat("resp_mask", T, 0, False),
                    torch.cat([p.truncated for p in parts]))


GENERATION_MODES = ("dynamic", "static", "compiled")
STATIC_BUCKET = 128  # static caches come in widths that are multiples of this: few recompiles
_static = weakref.WeakKeyDictionary()  # model -> its decode function and its last StaticCache


class _StaticCache(transformers.StaticCache):
    """A preallocated KV cache holding keys in the values' dtype. Under bf16 autocast, Qwen3's
    q/k RMSNorm hands the cache float32 keys next to bfloat16 values, and a static buffer has
    one dtype; attention casts both to bf16 anyway, so this changes no number."""

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_states.to(value_states.dtype), value_states, *args, **kwargs)


class _FilledPrefix(DynamicLayer):
    """A "dynamic" cache layer that writes into a buffer allocated once per rollout, where
    transformers' DynamicLayer concatenates: its `torch.cat` copies the whole cache every token
    (30% of a CPU rollout at tools/bench.py --shape qwen3-3m). Attention reads the filled prefix as a
    view: the same keys and values DynamicLayer would hand it, so the same numbers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.filled = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        N, H, _, D = key_states.shape
        self.key_buffer = key_states.new_empty(N, H, self.capacity, D)
        self.value_buffer = value_states.new_empty(N, *value_states.shape[1:2], self.capacity,
                                                   value_states.shape[-1])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.filled, key_states.shape[-2]
        self.key_buffer[:, :, n:n + m] = key_states
        self.value_buffer[:, :, n:n + m] = value_states
        self.filled = n + m
        self.keys, self.values = self.key_buffer[:, :, :n + m], self.value_buffer[:, :, :n + m]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor):
        """Rows `indices` of the cache: a prefill of the distinct prompts, handed to each row."""
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys = self.key_buffer[:, :, :self.filled]
        self.values = self.value_buffer[:, :, :self.filled]


def _filled_prefix_cache(model, capacity: int):
    n_layers = model.config.get_text_config().num_hidden_layers
    return Cache(layers=[_FilledPrefix(capacity) for _ in range(n_layers)])


def cache_argument(model) -> str:
    """The KV cache's keyword in this transformers' forward, and its output's attribute:
    `cache` from 5.24 (where `past_key_values` still works, with a deprecation warning),
    `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _eager_step(model, **inputs):
    return model(**inputs)  # through __call__, so module hooks (FSDP's) run


def _static_decoder(model, rows: int, width: int, compiled: bool):
    """A StaticCache of `width` slots for `rows` sequences and the function that runs one
    decode step as step(model, **inputs). The function is compiled once per model (torch.compile
    then specialises it per shape; unbound, so the table does not keep the model alive); the
    cache is reused while the shape stays the same, since a CUDA graph is recorded for the
    buffer addresses it saw."""
    entry = _static.setdefault(model, {})
    if entry.get("compiled") != compiled:
        step = (torch.compile(type(model).forward, mode="reduce-overhead") if compiled
                else _eager_step)
        entry.update(compiled=compiled, shape=None, step=step)
    if entry["shape"] != (rows, width):  # keep one cache: a KV cache can be gigabytes
        entry.update(shape=(rows, width), cache=_StaticCache(config=model.config, max_cache_len=width))
    entry["cache"].reset()  # zero the keys/values and the fill position
    return entry["cache"], entry["step"]


@torch.no_grad()  # not inference_mode: the sampled ids are later saved for backward
def nucleus(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(N, V) logits with every token outside the top-k and outside the top-p nucleus set to
    -inf (top_k 0 and top_p 1 keep all). The nucleus is the smallest set of most likely tokens
    whose probability reaches top_p, as in HF's and vLLM's samplers. Only SAMPLING is
    truncated: the losses score the sampled tokens under the full softmax, as OPSD's and
    PTD-PO's official codes do (docs/fidelity.md F5)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = logits.sort(dim=-1, descending=True)
        p = sorted_z.softmax(-1)
        outside = (p.cumsum(-1) - p) >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def next_positions(pos: torch.Tensor) -> torch.Tensor:
    """(N, 1): the position of each row's first generated token, one after its largest so
    far. For text that is its last position + 1; after an image, M-RoPE has advanced the
    positions by the image's largest side, not by its token count (vision.py)."""
    return (pos.amax(dim=(0, 2)) if pos.dim() == 3 else pos.amax(dim=1))[:, None] + 1


def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float,
             eos_id: int | list[int], pad_id: int, generator: torch.Generator | None = None,
             mode: str = "dynamic", top_k: int = 0, top_p: float = 1.0,
             prefill_inputs: dict | None = None, prefill_positions=None,
             banned_ids: list[int] | None = None) -> Rollouts:
    """Sample responses with the KV cache; temperature 0 is greedy. A row ends at the first of
    its `eos_id` tokens (one id or several, see `stop_ids`); sampling stops when all have.

    Written out instead of `model.generate` so that sampling is exactly softmax(z / T) over
    the full vocabulary unless `top_k` / `top_p` ask for truncation (`nucleus`; no default
    top-k), uses our own torch.Generator (reproducible and resumable), and costs one small
    forward per token.

    mode: "dynamic" grows the cache by concatenation (transformers' default, any device).
    "static" preallocates it (`StaticCache`, width rounded up to STATIC_BUCKET) so every decode
    step has the same shapes; "compiled" adds `torch.compile(mode="reduce-overhead")` on the
    decode step, which replays it as one CUDA graph instead of hundreds of small kernel
    launches (the prefill stays eager). "compiled" is for one CUDA process; the first call
    per shape compiles (tens of seconds).

    A vision-language model's images go in `prefill_inputs` (pixel values, patch grids), with
    its M-RoPE `prefill_positions` (vision.rope_positions): the vision tower runs once, in the
    prefill; each generated token is text, one position after the largest so far.
    `banned_ids` are never sampled: the image placeholder tokens, which a forward would read as
    images (the losses still normalise over the full vocabulary; a trained model gives these
    ids ~0 probability after its prompt).
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"generation mode {mode!r}: expected one of {GENERATION_MODES}")
    N, Lp = prompt_ids.shape
    stop = torch.as_tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id],
                           device=prompt_ids.device)  # -1 never matches: no stop at all
    width = Lp + max_new_tokens
    cache, step = _filled_prefix_cache(model, width), _eager_step
    if mode != "dynamic":
        width = -(-width // STATIC_BUCKET) * STATIC_BUCKET
        cache, step = _static_decoder(model, N, width, compiled=mode == "compiled")
    # the whole attention mask up front: each step passes a view (dynamic: a growing one;
    # static: all of it, as slots not yet written are hidden by the causal mask)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(N, width - Lp)], 1)
    if prefill_inputs and mode != "dynamic":
        raise ValueError("images, videos and audio are sampled with --generation dynamic")
    pos = positions(prompt_mask) if prefill_positions is None else prefill_positions
    kv = cache_argument(model)
    # rows that repeat a prompt (a group's G rollouts) share its prefill: each distinct prompt
    # runs once and its cache rows are copied out to the rows that repeat it
    shared = distinct_prompts(prompt_ids, prompt_mask) if mode == "dynamic" and not prefill_inputs else None
    rows = slice(None) if shared is None else shared[0]
    out = model(input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows],
                position_ids=pos[rows], use_cache=True, logits_to_keep=1, **{kv: cache},
                **(prefill_inputs or {}))
    cache, last = getattr(out, kv), out.logits[:, -1]
    if shared is not None:
        cache.batch_select_indices(shared[1])
        last = last[shared[1]]
    next_pos = next_positions(pos)
    done = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = last.float()  # used up before the next step (a CUDA graph reuses it)
        if banned_ids:
            logits[:, banned_ids] = float("-inf")
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(nucleus(logits / temperature, top_k=top_k, top_p=top_p), -1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, stop)
        if done.all():
            break
        out = step(model, input_ids=tok[:, None], position_ids=next_pos, **{kv: cache},
                   attention_mask=mask if mode != "dynamic" else mask[:, :Lp + t + 1],
                   use_cache=True)
        last = out.logits[:, -1]
        next_pos = next_pos + 1
    resp = torch.stack(tokens, dim=1)
    # a token is part of the response iff no <eos> came strictly before it
    is_eos = torch.isin(resp, stop).long()
    eos_before = is_eos.cumsum(1) - is_eos
    resp_mask = (eos_before == 0).long()
    return Rollouts(prompt_ids, prompt_mask, resp, resp_mask, truncated=~done)
