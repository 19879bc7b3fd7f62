"""One training loop for every algorithm: `python train.py` on a laptop, `torchrun` on nodes.

    python train.py                                   # RLSD on the embedded toy task (CPU)
    python train.py --algo grpo --steps 100
    torchrun --nproc_per_node=8 train.py --algo rlsd --model Qwen/Qwen3-8B --data train.jsonl

How to read it: `train_step` is one optimizer step of every algorithm, as numbered steps
    1 sample      G responses per prompt with the KV cache            batch.sample
    2 reward      the verifier on each response (DAPO: re-roll)       batch.sample, dapo_resample
    3 advantages  group-relative, (r - mean) / std or r - mean        grpo.group_advantages
    4 teacher     each row's privileged prompt, the distilled rows    batch.teacher_prompts
    5 score       no-grad log-probs of the sampled tokens under the teacher (RLSD, OPD) and
                  the KL reference, computed once                     teachers.py
    6 loss        per micro-batch, per chunk of positions             losses.chunk_loss
    7 update      clip the global gradient norm, AdamW
    8 teacher     sync / EMA the teacher toward the student           teachers.Teacher.update
and `train` is the setup plus the loop around it. What each algorithm does differently is in
losses.py (one branch each); the options and each paper's defaults are in config.py.
"""
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

import batch as rollouts
import checkpoint as ckpt
import data
import grpo
import losses
from batch import Batch
from config import Config, parse_config, resolve_config
from distributed import Dist, Stopwatch, autocast, setup_distributed, shard, teardown
from eval import eval_sets, evaluate
from rollout import build_toy_model, build_toy_tokenizer, left_pad, load_model
from rlsd import lambda_schedule
from teachers import Teacher, chunked_logits, lm_head_logits, response_hidden, sampled_token_logprobs

TOY_VERSION = "v1"  # bump when the toy task or model changes, to invalidate cached warm starts


# ----------------------------------------------------------------------------------------
# Models: the cached toy warm start, the student, teachers
# ----------------------------------------------------------------------------------------

def cache_dir(cfg: Config) -> str:
    return cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "rlsd-reference")


def toy_checkpoint(cfg: Config, dist: Dist, *, steps: int, name: str) -> str:
    """The warm-started toy model, trained once (`--algo sft` on the toy task) and cached."""
    path = os.path.join(cache_dir(cfg), f"toy-{TOY_VERSION}-{name}-sft{steps}-seed{cfg.seed}")
    if not os.path.exists(path) and dist.rank == 0:
        print(f"warm start: training the toy model with SFT for {steps} steps -> {path}", flush=True)
        run_dir = path + ".run"
        sft = resolve_config(dict(algo="sft", model="toy", steps=steps, seed=cfg.seed,
                                  out=run_dir, cache_dir=cfg.cache_dir, eval_every=0,
                                  save_every=0, keep_checkpoints=1, eval_data="toy",
                                  eval_n=cfg.eval_n))
        train(sft, Dist(device=dist.device))  # always one local process
        os.replace(ckpt.latest_checkpoint(run_dir), path)
    dist.barrier()
    return path


def load_policy(cfg: Config, dist: Dist, name: str):
    """(model, tokenizer) for 'toy-init' (random), 'toy' (cached warm start) or a path/hub id."""
    dtype = torch.float32  # master weights; bf16 compute comes from FSDP's policy or autocast
    if name == "toy-init" or (name == "toy" and cfg.algo == "sft"):  # --algo sft IS the warm start
        tok = build_toy_tokenizer()
        return build_toy_model(tok, seed=cfg.seed).to(dist.device), tok
    if name == "toy":
        name = toy_checkpoint(cfg, dist, steps=cfg.warm_start_steps, name="student")
    return load_model(name, dtype=dtype, device=dist.device)


def teacher_and_reference(cfg: Config, model, tok, dist: Dist):
    """(Teacher, KL reference or None), and the student sharded with them under torchrun.

    The teacher's own weights (frozen, sync, ema, trust) and the reference are copies of the
    initial student. The reference is never the same object as a teacher that moves (sync,
    EMA; audit F10): then it gets a copy of its own."""
    own = cfg.teacher_mode in ("frozen", "sync", "ema", "trust")
    initial = copy.deepcopy(model) if own else None
    ref = None
    if cfg.kl_coef > 0:
        moving = cfg.teacher_mode in ("sync", "ema")
        ref = initial if (initial is not None and not moving) else copy.deepcopy(model)
    if cfg.teacher_mode == "external":
        name = cfg.teacher
        if name == "toy":  # a stronger toy teacher: the same SFT, three times longer
            name = toy_checkpoint(cfg, dist, steps=3 * cfg.warm_start_steps, name="teacher")
        initial, t_tok = load_model(name, device=dist.device)
        if len(t_tok) != len(tok):
            raise SystemExit(f"--teacher {cfg.teacher}: vocabulary of {len(t_tok)} tokens, "
                             f"the student has {len(tok)}; OPD needs a shared tokenizer")
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    for m in {id(x): x for x in (model, initial, ref) if x is not None}.values():
        shard(m, dist, dtype)
    teacher = Teacher(cfg.teacher_mode, initial, sync_every=cfg.teacher_sync,
                      ema_rate=cfg.teacher_ema)
    return teacher, ref


# ----------------------------------------------------------------------------------------
# The pieces of a step: global normalisers, micro-batches, chunks, metrics, the update
# ----------------------------------------------------------------------------------------

@dataclass
class Norms:
    """Global denominators (all ranks, all micro-batches). Each micro-batch's loss is its sum
    divided by these, so the micro-batch gradients add up to the full batch's gradient, however
    the batch is split (STYLE §3; verl's batch_num_tokens, RLSD's `x world / total` rescale)."""
    tokens: float                # loss tokens: token-mean (DAPO Eq. 12, the RLSD code)
    rows: float                  # rows with a loss token: GRPO's per-sequence mean (Eq. 3)
    rows_x_len: float            # rows x max_new_tokens: Dr. GRPO's constant (Sec. 3.1)
    distill_tokens: float        # tokens of distilled rows: OPSD, SDPO, SRPO, the PTD term
    w_mean: float | None = None  # SRPO: mean exp(-beta H_teacher) over its SDPO tokens


def global_norms(b: Batch, cfg: Config, dist: Dist) -> Norms:
    mask_NT = b.mask
    d_mask = mask_NT & b.distill[:, None] if b.distill is not None else mask_NT[:, :0]
    return Norms(tokens=dist.sum(mask_NT.sum()).item(),
                 rows=dist.sum((mask_NT.sum(1) > 0).sum()).item(),
                 rows_x_len=dist.sum(len(b.examples) * cfg.max_new_tokens).item(),
                 distill_tokens=dist.sum(d_mask.sum()).item())


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
    h_nTH = response_hidden(model, b.prompt_ids, b.prompt_mask, b.resp_ids, b.resp_mask)
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
# One RL / distillation step
# ----------------------------------------------------------------------------------------

def train_step(model, opt, *, tok, teacher: Teacher, ref, examples, step: int, cfg: Config,
               dist: Dist, gen: torch.Generator, sw: Stopwatch):
    """One optimizer step of `cfg.algo`, steps 1-8 of the module docstring. Returns the step's
    metrics (means over all ranks) and its Batch."""
    G, T = cfg.group_size, cfg.temperature
    tpl = data.templates(cfg.data)
    prompts = data.step_examples(examples, step, prompts_per_step=cfg.prompts_per_step,
                                 seed=cfg.seed, rank=dist.rank, world=dist.world)
    exs = [e for e in prompts for _ in range(G)]  # rows p*G .. p*G+G-1: prompt p's group

    # 1-2. sample G responses per prompt and reward them with the verifier
    model.eval()
    sample = partial(rollouts.sample, model, tok, template=tpl["student"],
                     max_new_tokens=cfg.max_new_tokens, temperature=T, ignore_eos=cfg.ignore_eos,
                     generation=cfg.generation, overlong_cache=cfg.overlong_cache, generator=gen,
                     device=dist.device)
    with sw("rollout"):
        b = sample(exs)
        if cfg.algo == "dapo":  # dynamic sampling: re-roll groups that carry no signal
            b = rollouts.dapo_resample(b, sample, group_size=G, rounds=cfg.dapo_max_gen_batches,
                                       pad_id=tok.pad_token_id)
        b.rewards, b.in_loss = b.rewards.to(dist.device), b.in_loss.to(dist.device)

        # 3. advantages: within each group, so a group of equal rewards gets exactly 0
        b.adv = grpo.group_advantages(b.rewards, G, scale=cfg.adv_scale)

        # 4. teacher prompts: the student prompt plus the privileged context, then the SAME
        # response ids; and which rows the distillation term averages over
        if teacher.mode != "none":
            b.teacher_ids, b.teacher_mask, b.has_context = rollouts.teacher_prompts(
                tok, b, context=cfg.context, templates=tpl, group_size=G,
                success_threshold=cfg.success_threshold, device=dist.device)
            b.distill, b.kl_off = losses.distilled_rows(
                cfg.algo, b, group_size=G, success_threshold=cfg.success_threshold,
                ptd_tau=cfg.ptd_tau)

    # 5. score, without gradient and once per step: the log-probs of the sampled tokens under
    # the teacher (RLSD's evidence, OPD's advantage) and under the KL reference
    model.train()
    mbs = micro_batches(b, cfg.micro_batch_size)
    chunks = [column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, cfg.logit_chunk)
              for mb in mbs]  # the loss uses the same chunks, so the numbers are identical
    norms = global_norms(b, cfg, dist)
    with sw("teacher"):
        if cfg.algo in losses.SAMPLED_TOKEN_TEACHER:
            b.teacher_logp = torch.cat([sampled_token_logprobs(
                teacher.logits(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids, mb.resp_mask),
                mb.resp_ids, temperature=T, chunks=ch) for mb, ch in zip(mbs, chunks)])
        if cfg.kl_coef > 0:
            b.ref_logp = torch.cat([sampled_token_logprobs(
                chunked_logits(ref, mb.prompt_ids, mb.prompt_mask, mb.resp_ids, mb.resp_mask),
                mb.resp_ids, temperature=T, chunks=ch) for mb, ch in zip(mbs, chunks)])
        mbs = micro_batches(b, cfg.micro_batch_size)  # now with the scores
        if cfg.algo == "srpo":  # pass 1 of its entropy-weight normaliser: a whole-batch mean
            norms.w_mean = srpo_weight_mean(model, teacher, mbs, chunks, cfg, dist)
    # RLSD's lambda: 0.5 decaying linearly to 0 over 50 steps, after which RLSD is GRPO
    lam = lambda_schedule(step, lam0=cfg.lam0, warmup=cfg.lam_warmup,
                          decay=cfg.lam_decay) if cfg.algo == "rlsd" else 0.0

    # 6. loss and backward, a micro-batch at a time and a chunk of positions at a time
    metrics, loss_sum = Metrics(), 0.0
    for mb, ch in zip(mbs, chunks):
        t_logits = None
        if cfg.algo in losses.DISTRIBUTION_TEACHER:  # the teacher's whole next-token distribution
            with sw("teacher"):
                t_logits = teacher.logits(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids,
                                          mb.resp_mask)

        def loss_fn(h_ntH, t0, t1, mb=mb, t_logits=t_logits):  # run again in backward
            logits_ntV = lm_head_logits(model, h_ntH)
            c = mb.positions(t0, t1)
            logp_nt = grpo.token_logprobs(logits_ntV, c.resp_ids, temperature=T)
            return losses.chunk_loss(cfg, c, logits_ntV, logp_nt,
                                     t_logits(t0, t1) if t_logits else None, norms, lam)

        with sw("fwd_bwd"):
            loss_sum += backward_chunked(model, mb, ch, loss_fn, dist.world, metrics)
    loss = dist.sum(loss_sum).item()

    # 7. update: clip the global gradient norm, AdamW (skipped if anything is not finite)
    with sw("optimizer"):
        grad_norm, skipped = clip_and_step(model, opt, cfg, loss, step)
        # 8. teacher: sync (RLSD) or EMA (SDPO, SRPO), never after a skipped step
        if not skipped:
            teacher.update(model, step)

    out = metrics.means(dist)
    n = dist.sum(len(b.examples)).item()
    out.update(loss=loss, grad_norm=grad_norm, skipped=float(skipped), tokens=norms.tokens,
               reward_mean=dist.sum(b.rewards.sum()).item() / n,
               response_len_mean=dist.sum(b.resp_mask.sum()).item() / n,
               truncated_frac=dist.sum(b.truncated.sum()).item() / n)
    if cfg.algo == "rlsd":
        out["rlsd_lambda"] = lam
    if b.distill is not None:
        out["distilled_frac"] = dist.sum(b.distill.float().sum()).item() / n
    return out, b


@torch.no_grad()
def srpo_weight_mean(model, teacher: Teacher, mbs: list, chunks: list, cfg: Config,
                     dist: Dist) -> float:
    """Pass 1 of SRPO's two-pass normaliser: the mean of exp(-beta H_teacher) over every SDPO
    token of the batch (all ranks), so the weights have mean 1 over the whole batch (Sec. 3.2).
    It costs one more teacher forward per micro-batch: the teacher's hidden states are not
    kept from here to the loss, which would hold them for the whole batch at once."""
    total, count = 0.0, 0.0
    for mb, ch in zip(mbs, chunks):
        t_logits = teacher.logits(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids, mb.resp_mask)
        for t0, t1 in ch:
            s, n = losses.srpo_weight_sum(t_logits(t0, t1), mb.positions(t0, t1),
                                          srpo_beta=cfg.srpo_beta, temperature=cfg.temperature)
            total, count = total + s.item(), count + n.item()
    total, count = dist.sum(total).item(), dist.sum(count).item()
    return total / count if count else 1.0


# ----------------------------------------------------------------------------------------
# SFT: the toy warm start, or supervised fine-tuning on a dataset's solutions
# ----------------------------------------------------------------------------------------

# the toy warm start: 30% of its prompts carry the answer, so that the same network later
# acts as a teacher that USES a privileged context (30%, not 20%: measured, see data.py)
TOY_SFT_MIX = ["student"] * 4 + ["answer"] * 3 + ["solution", "hint", "rationale"]


def sft_batch(examples, step: int, tok, cfg: Config, dist: Dist) -> Batch:
    """Prompt -> reference solution (or the answer). On the toy task the prompts mix in every
    privileged context (TOY_SFT_MIX), so that the network learns to read them."""
    exs = data.step_examples(examples, step, prompts_per_step=cfg.prompts_per_step,
                             seed=cfg.seed, rank=dist.rank, world=dist.world)
    rng = random.Random(f"{cfg.seed}-{step}-{dist.rank}")  # a string seed: stable across runs
    tpl = data.templates(cfg.data)
    prompts, targets = [], []
    for e in exs:
        kind = rng.choice(TOY_SFT_MIX) if cfg.data == "toy" else "student"
        kind = kind if kind == "student" or getattr(e, kind) else "student"
        prompts.append(data.prompt_ids(tok, data.render(tpl[kind], e)))
        target = e.solution or e.answer
        targets.append(tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    n, T = len(exs), max(map(len, targets))
    resp = torch.full((n, T), tok.pad_token_id, dtype=torch.long)  # right-padded targets
    rmask = torch.zeros((n, T), dtype=torch.long)
    for i, t in enumerate(targets):
        resp[i, :len(t)], rmask[i, :len(t)] = torch.tensor(t), 1
    return Batch(exs, *(x.to(dist.device) for x in (ids, mask, resp, rmask)),
                 truncated=torch.zeros(n, dtype=torch.bool), texts=[], rewards=torch.zeros(n),
                 in_loss=torch.ones(n, dtype=torch.bool, device=dist.device))


def sft_step(model, opt, b: Batch, cfg: Config, dist: Dist, step: int) -> dict:
    """Token-mean negative log-likelihood of the targets, with the same chunked scaffold."""
    model.train()
    norm = dist.sum(b.mask.sum()).item()  # global target tokens

    def nll(h_ntH, t0, t1, mb):
        c = mb.positions(t0, t1)
        logp_nt = grpo.token_logprobs(lm_head_logits(model, h_ntH), c.resp_ids)
        return grpo.aggregate(-logp_nt, c.mask, normalizer=norm), {}

    loss_sum = 0.0
    for mb in micro_batches(b, cfg.micro_batch_size):
        ch = column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, cfg.logit_chunk)
        loss_sum += backward_chunked(model, mb, ch, partial(nll, mb=mb), dist.world, Metrics())
    loss = dist.sum(loss_sum).item()
    grad_norm, skipped = clip_and_step(model, opt, cfg, loss, step)
    return dict(loss=loss, grad_norm=grad_norm, skipped=float(skipped), tokens=norm)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def log_line(step, total, metrics, t_start):
    done = int(20 * step / max(total, 1))
    eta = (time.time() - t_start) / max(step, 1) * (total - step)
    keys = ("reward_mean", "loss", "entropy", "response_len_mean", "rlsd_lambda",
            "rlsd_weight_clip_frac", "distilled_frac", "kl", "test_acc", "ood_acc")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    print(f"[{'#' * done}{'.' * (20 - done)}] {step}/{total} | " + " | ".join(parts)
          + f" | {metrics.get('step_time_s', 0):.2f}s/step eta {eta / 60:.1f}m", flush=True)


def start_metrics_log(path: str, start: int):
    """metrics.jsonl for a run starting after step `start`: on resume, the lines of steps after
    the checkpoint are dropped (they will be redone). Replaced atomically: never half-written."""
    keep = []
    if start and os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get("step", 0) <= start]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def train(cfg: Config, dist: Dist) -> dict:
    torch.manual_seed(cfg.seed)
    main_rank = dist.rank == 0
    columns = {c: getattr(cfg, c + "_key") for c in data.COLUMNS}  # --prompt-key etc.
    # OPSD's solution (or rationale) must be on every row; PTD-PO's hint may be missing on
    # some rows (they are simply not distilled) but not on all
    need = (cfg.context,) if cfg.context in ("solution", "rationale") else ()
    examples = data.load_data(cfg.data, "train", n_toy=20000, seed=cfg.seed, columns=columns,
                              need=need)
    if cfg.context == "hint" and not any(e.hint for e in examples):
        raise data.DataError(f"{cfg.data}: no row has a '{cfg.hint_key}' value, and "
                             f"--algo {cfg.algo} distils toward the hint-conditioned teacher")
    sets = eval_sets(cfg, columns)
    model, tok = load_policy(cfg, dist, cfg.model)
    if cfg.max_prompt_tokens:
        examples = data.drop_long_prompts(examples, tok, data.templates(cfg.data)["student"],
                                          cfg.max_prompt_tokens, cfg.long_prompts,
                                          source=cfg.data, verbose=main_rank)

    teacher, ref = teacher_and_reference(cfg, model, tok, dist)  # shards the student too
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # one sampling stream per rank (1_000_003 is a prime: ranks and seeds never share one)
    gen = torch.Generator(device=dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank)
    start = ckpt.restore(model, opt, teacher, gen, cfg, dist) if cfg.resume else 0

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if main_rank:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        start_metrics_log(metrics_path, start)
    dist.barrier()

    def log(record):
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    first = {}
    if start == 0 and sets:
        first = evaluate(model, tok, sets, cfg, dist)
        log({"step": 0, **first})
        if main_rank:
            print("before training: " + " | ".join(f"{k}={v:.3f}" for k, v in first.items()),
                  flush=True)
    t_start, last, skips = time.time(), {}, 0
    for step in range(start + 1, cfg.steps + 1):
        t0, sw = time.time(), Stopwatch(dist.device)
        with autocast(cfg.dtype, dist):
            if cfg.algo == "sft":
                m = sft_step(model, opt, sft_batch(examples, step, tok, cfg, dist), cfg, dist, step)
            else:
                m, _ = train_step(model, opt, tok=tok, teacher=teacher, ref=ref,
                                  examples=examples, step=step, cfg=cfg, dist=dist, gen=gen, sw=sw)
        m["step_time_s"] = time.time() - t0
        m.update({f"time_{k}_s": v for k, v in sw.times.items()})
        if sets and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            m.update(evaluate(model, tok, sets, cfg, dist))  # greedy: consumes no RNG
        last = {"step": step, **m}
        log(last)
        if main_rank and (step % cfg.log_every == 0 or step == cfg.steps):
            log_line(step, cfg.steps, m, t_start)
        skips = skips + 1 if m["skipped"] else 0
        if skips >= cfg.max_skips:  # the weights are untouched: the last checkpoint is good
            raise SystemExit(f"stopping at step {step}: {skips} consecutive steps with a "
                             f"non-finite loss or gradient norm (loss={m['loss']}, "
                             f"grad_norm={m['grad_norm']}); weights were not updated, the last "
                             f"checkpoint in {cfg.out} is intact. Lower --lr or check the data.")
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            ckpt.save(model, opt, teacher, tok, gen, cfg, dist, step)
    if main_rank and first and last:
        print("after training:  " + " | ".join(f"{k}={last[k]:.3f}" for k in first if k in last),
              flush=True)
    return {"before": first, "after": last}


def main(argv=None):
    cfg = parse_config(argv)
    dist = setup_distributed()
    if cfg.prompts_per_step % dist.world:  # every rank must run the same number of passes
        raise SystemExit(f"config error: --prompts-per-step {cfg.prompts_per_step} is not "
                         f"divisible by the {dist.world} processes")
    if cfg.generation == "compiled" and dist.world > 1:  # FSDP hooks in a CUDA graph: untested
        raise SystemExit("config error: --generation compiled runs in one process; under "
                         "torchrun use --generation static or dynamic")
    try:
        train(cfg, dist)
    except (data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        teardown(dist)


if __name__ == "__main__":
    main()
