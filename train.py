"""One training loop for every algorithm: `python train.py` on a laptop, `torchrun` on nodes.

    python train.py                                   # RLSD on the embedded toy task (CPU)
    python train.py --algo grpo --steps 100
    torchrun --nproc_per_node=8 train.py --algo rlsd --model Qwen/Qwen3-8B --data train.jsonl

One step: sample prompts -> G rollouts each (KV cache) -> verifier rewards -> advantages ->
privileged teacher prompts + the student's exact response ids -> the algorithm's loss from
grpo.py / rlsd.py / distill.py -> backward per micro-batch -> clip -> AdamW -> teacher update.

What differs between algorithms lives in algos.py as small functions the loop calls
(`collect`, `add_teacher_prompts`, `Teacher`, `LOSSES`); the options and each paper's
defaults live in config.py.
"""
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

import checkpoint as ckpt
import data
import grpo
from algos import (LOSSES, Batch, Outputs, Teacher, collect, column_chunks, distill_rows,
                   global_norms, masked_mean, micro_batches, srpo_weight_mean, step_examples)
from config import Config, parse_config, resolve_config
from distributed import (Dist, Stopwatch, autocast, limit_heap_fragmentation, setup_distributed,
                         shard)
from eval import eval_sets, evaluate
from rollout import (Rollouts, build_toy_model, build_toy_tokenizer, left_pad, lm_head_logits,
                     load_model, response_hidden)

TOY_VERSION = "v1"  # bump when the toy task or model changes, to invalidate cached warm starts


# ----------------------------------------------------------------------------------------
# Models: the cached toy warm start, the student, teachers
# ----------------------------------------------------------------------------------------

def cache_dir(cfg: Config) -> str:
    return cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "rlsd-reference")


def toy_checkpoint(cfg: Config, ctx: Dist, *, steps: int, name: str) -> str:
    """The warm-started toy model, trained once (`--algo sft` on the toy task) and cached."""
    path = os.path.join(cache_dir(cfg), f"toy-{TOY_VERSION}-{name}-sft{steps}-seed{cfg.seed}")
    if not os.path.exists(path) and ctx.rank == 0:
        print(f"warm start: training the toy model with SFT for {steps} steps -> {path}", flush=True)
        run_dir = path + ".run"
        sft = resolve_config(dict(algo="sft", model="toy", steps=steps, seed=cfg.seed,
                                  out=run_dir, cache_dir=cfg.cache_dir, eval_every=0,
                                  save_every=0, keep_checkpoints=1, eval_data="toy",
                                  eval_n=cfg.eval_n))
        train(sft, Dist(device=ctx.device))  # always one local process
        os.replace(ckpt.latest_checkpoint(run_dir), path)
    ctx.barrier()
    return path


def load_policy(cfg: Config, ctx: Dist, name: str):
    """(model, tokenizer) for 'toy-init' (random), 'toy' (cached warm start) or a path/hub id."""
    dtype = torch.float32  # master weights; bf16 compute comes from FSDP's policy or autocast
    if name == "toy-init" or (name == "toy" and cfg.algo == "sft"):  # --algo sft IS the warm start
        tok = build_toy_tokenizer()
        return build_toy_model(tok, seed=cfg.seed).to(ctx.device), tok
    if name == "toy":
        name = toy_checkpoint(cfg, ctx, steps=cfg.warm_start_steps, name="student")
    return load_model(name, dtype=dtype, device=ctx.device)


def clip_and_step(model, opt, cfg: Config, loss: float):
    """Clip the (already synced) gradients and step, unless the loss or the norm is not finite:
    a NaN step would poison the weights for good. `loss` and the norm are global values, so
    every rank takes the same decision. Returns (grad_norm, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
    skipped = not (math.isfinite(norm) and math.isfinite(loss))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


def ref_logprobs(ref, mb: Batch, cfg: Config, chunks) -> torch.Tensor:
    """(n, T) log-probs of the sampled tokens under the frozen reference, chunk by chunk."""
    ro = mb.ro
    with torch.no_grad():
        h = response_hidden(ref, ro.prompt_ids, ro.prompt_mask, ro.resp_ids, ro.resp_mask)
        return torch.cat([grpo.token_logprobs(lm_head_logits(ref, h[:, t0:t1]), ro.resp_ids[:, t0:t1],
                                              temperature=cfg.temperature) for t0, t1 in chunks], 1)


def chunk_loss(h, model, mb: Batch, teacher_logits, t0, t1, ref_logp, norms, cfg: Config):
    """The algorithm's loss on response positions t0:t1 (mb is already cut to them), from the
    student's hidden states. Run under activation checkpointing: the student's and the teacher's
    logits of the chunk are recomputed in backward, never stored, so memory holds one chunk's
    logits instead of the whole (n, T, V)."""
    logits = lm_head_logits(model, h)
    out = Outputs(logits, grpo.token_logprobs(logits, mb.ro.resp_ids, temperature=cfg.temperature),
                  teacher_logits(t0, t1) if teacher_logits else None, ref_logp)
    loss, m = LOSSES[cfg.algo](cfg, mb, out, norms)
    m["entropy"] = masked_mean(grpo.entropy(logits.detach(), temperature=cfg.temperature), mb.mask)
    return loss, m


def train_step(model, opt, teacher, ref, b: Batch, cfg: Config, ctx: Dist, step: int,
               sw: Stopwatch) -> dict:
    """Loss over micro-batches and chunks of positions with global normalizers, then one
    clipped optimizer step."""
    model.train()
    mbs = micro_batches(b, cfg)
    norms = global_norms(b, cfg, ctx, step)
    if cfg.algo == "srpo":
        with sw("teacher"):
            norms.w_mean = srpo_weight_mean(model, teacher, mbs, cfg, ctx)
    sums, loss_sum = {}, 0.0
    for mb in mbs:
        ro = mb.ro
        chunks = column_chunks(mb, model, cfg)
        with sw("teacher"):  # no-grad scoring: the privileged teacher and the KL reference
            t_logits = (teacher.chunked(model, mb.t_ids, mb.t_mask, ro.resp_ids, ro.resp_mask)
                        if teacher.mode != "none" else None)
            ref_logp = ref_logprobs(ref, mb, cfg, chunks) if cfg.kl_coef > 0 else None
        with sw("fwd_bwd"):
            h = response_hidden(model, ro.prompt_ids, ro.prompt_mask, ro.resp_ids, ro.resp_mask)
            total = 0.0
            # one chunk (a small vocabulary): nothing to save by recomputing it in backward
            run = chunk_loss if len(chunks) == 1 else partial(
                torch.utils.checkpoint.checkpoint, chunk_loss, use_reentrant=False)
            for t0, t1 in chunks:
                part = mb.cols(t0, t1)
                loss, m = run(h[:, t0:t1], model, part, t_logits, t0, t1,
                              None if ref_logp is None else ref_logp[:, t0:t1], norms, cfg)
                total = total + loss
                n = part.mask.sum()
                for k, v in m.items():  # tensors: read once per step, not once per chunk
                    sums[k] = sums.get(k, 0.0) + v.double() * n
            # FSDP averages gradients over ranks; our normalizers are already global: undo it
            (total * ctx.world).backward()
            loss_sum += float(total.detach())
    loss = ctx.sum(loss_sum).item()
    with sw("optimizer"):
        grad_norm, skipped = clip_and_step(model, opt, cfg, loss)
        if not skipped:  # a skipped step must not move the teacher either (EMA, sync)
            teacher.after_step(model, step)
    metrics = {k: ctx.sum(v).item() / max(norms.tokens, 1.0) for k, v in sums.items()}
    metrics.update(loss=loss, grad_norm=grad_norm, skipped=float(skipped), tokens=norms.tokens)
    if cfg.algo == "rlsd":
        metrics["rlsd_lambda"] = norms.lam
    rows = distill_rows(cfg, b)
    if rows is not None:
        metrics["distilled_frac"] = ctx.sum(rows.float().sum()).item() / ctx.sum(len(b.ex)).item()
    return metrics


# ----------------------------------------------------------------------------------------
# SFT: the toy warm start, or supervised fine-tuning on a dataset's solutions
# ----------------------------------------------------------------------------------------

TOY_SFT_MIX = ["student"] * 4 + ["answer"] * 3 + ["solution", "hint", "rationale"]


def sft_batch(examples, step, tok, cfg: Config, ctx: Dist) -> Batch:
    """Prompt -> reference solution. On the toy task half the prompts carry a privileged
    context, so that the same network can later act as a teacher that USES the answer."""
    exs = step_examples(examples, step, cfg, ctx)
    rng = random.Random(f"{cfg.seed}-{step}-{ctx.rank}")
    tpl = data.templates(cfg.data)
    prompts, targets = [], []
    for e in exs:
        kind = rng.choice(TOY_SFT_MIX) if cfg.data == "toy" else "student"
        kind = kind if kind == "student" or getattr(e, kind) else "student"
        prompts.append(data.prompt_ids(tok, data.render(tpl[kind], e)))
        target = e.solution or e.answer
        targets.append(tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    T = max(map(len, targets))
    resp = torch.full((len(exs), T), tok.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(exs), T), dtype=torch.long)
    for i, t in enumerate(targets):
        resp[i, :len(t)], rmask[i, :len(t)] = torch.tensor(t), 1
    ro = Rollouts(*(x.to(ctx.device) for x in (ids, mask, resp, rmask)),
                  truncated=torch.zeros(len(exs), dtype=torch.bool))
    n = len(exs)
    return Batch(exs, ro, torch.zeros(n), torch.zeros(n), [], torch.ones(n, dtype=torch.bool,
                 device=ctx.device))


def sft_step(model, opt, b: Batch, cfg: Config, ctx: Dist, step: int) -> dict:
    model.train()
    norm = ctx.sum(b.mask.sum()).item()
    loss_sum = 0.0
    def nll(h, model, part):  # checkpointed like chunk_loss: one chunk of logits at a time
        logp = grpo.token_logprobs(lm_head_logits(model, h), part.ro.resp_ids)
        return grpo.aggregate(-logp, part.mask, normalizer=norm)

    for mb in micro_batches(b, cfg):
        ro = mb.ro
        h = response_hidden(model, ro.prompt_ids, ro.prompt_mask, ro.resp_ids, ro.resp_mask)
        chunks = column_chunks(mb, model, cfg)
        run = nll if len(chunks) == 1 else partial(torch.utils.checkpoint.checkpoint, nll,
                                                   use_reentrant=False)
        loss = sum(run(h[:, t0:t1], model, mb.cols(t0, t1)) for t0, t1 in chunks)
        (loss * ctx.world).backward()
        loss_sum += loss.item()
    for g in opt.param_groups:  # linear warm-up over the first 50 steps, then constant
        g["lr"] = cfg.lr * min(1.0, step / 50)
    loss = ctx.sum(loss_sum).item()
    grad_norm, skipped = clip_and_step(model, opt, cfg, loss)
    return dict(loss=loss, grad_norm=grad_norm, skipped=float(skipped), tokens=norm)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def rollout_stats(b: Batch, ctx: Dist) -> dict:
    n = ctx.sum(len(b.ex)).item()
    return dict(reward_mean=ctx.sum(b.rewards.sum()).item() / n,
                response_len_mean=ctx.sum(b.ro.resp_mask.sum()).item() / n,
                truncated_frac=ctx.sum(b.ro.truncated.sum()).item() / n)


def log_line(step, total, metrics, t_start):
    done = int(20 * step / max(total, 1))
    eta = (time.time() - t_start) / max(step, 1) * (total - step)
    keys = ("reward_mean", "loss", "entropy", "response_len_mean", "rlsd_lambda",
            "rlsd_weight_clip_frac", "distilled_frac", "kl", "test_acc", "ood_acc")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    print(f"[{'#' * done}{'.' * (20 - done)}] {step}/{total} | " + " | ".join(parts)
          + f" | {metrics.get('step_time_s', 0):.2f}s/step eta {eta / 60:.1f}m", flush=True)


def train(cfg: Config, ctx: Dist) -> dict:
    if cfg.prompts_per_step % ctx.world:  # every rank must run the same number of passes
        raise SystemExit(f"config error: --prompts-per-step {cfg.prompts_per_step} is not "
                         f"divisible by the {ctx.world} processes")
    if cfg.generation == "compiled" and ctx.world > 1:  # FSDP hooks inside a CUDA graph: untested
        raise SystemExit("config error: --generation compiled runs in one process; under "
                         "torchrun use --generation static or dynamic")
    if cfg.malloc_threshold > 0 and ctx.device.type == "cpu":
        limit_heap_fragmentation(cfg.malloc_threshold)
    torch.manual_seed(cfg.seed)
    main_rank = ctx.rank == 0
    columns = {c: getattr(cfg, c + "_key") for c in data.COLUMNS}
    # OPSD's solution (or rationale) must be on every row; PTD-PO's hint may be missing on
    # some rows (they are simply not distilled) but not on all
    need = (cfg.context,) if cfg.context in ("solution", "rationale") else ()
    examples = data.load_data(cfg.data, "train", n_toy=20000, seed=cfg.seed, columns=columns,
                              need=need)
    if cfg.context == "hint" and not any(e.hint for e in examples):
        raise data.DataError(f"{cfg.data}: no row has a '{cfg.hint_key}' value, and "
                             f"--algo {cfg.algo} distils toward the hint-conditioned teacher")
    sets = eval_sets(cfg, columns)
    model, tok = load_policy(cfg, ctx, cfg.model)
    if cfg.max_prompt_tokens:
        examples = data.drop_long_prompts(examples, tok, data.templates(cfg.data)["student"],
                                          cfg.max_prompt_tokens, cfg.long_prompts,
                                          source=cfg.data, verbose=main_rank)
    initial = copy.deepcopy(model) if Teacher.needs_initial_copy(cfg) else None
    external = None
    if cfg.teacher_mode == "external":
        name = cfg.teacher
        if name == "toy":  # a stronger toy teacher: the same SFT, three times longer
            name = toy_checkpoint(cfg, ctx, steps=3 * cfg.warm_start_steps, name="teacher")
        external, t_tok = load_model(name, device=ctx.device)
        if len(t_tok) != len(tok):
            raise SystemExit(f"--teacher {cfg.teacher}: vocabulary of {len(t_tok)} tokens, "
                             f"the student has {len(tok)}; OPD needs a shared tokenizer")
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    for m in (model, initial, external):
        if m is not None:
            shard(m, ctx, dtype)
    teacher = Teacher(cfg, initial, external)
    ref = initial if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1_000_003 + ctx.rank)
    start = ckpt.restore(model, opt, teacher, gen, cfg, ctx) if cfg.resume else 0

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if main_rank:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        keep = []  # on resume, drop metrics of steps after the checkpoint (they will be redone)
        if start and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                keep = [line for line in f if json.loads(line).get("step", 0) <= start]
        with open(metrics_path + ".tmp", "w") as f:  # replace atomically: never lose the log
            f.writelines(keep)
        os.replace(metrics_path + ".tmp", metrics_path)
    ctx.barrier()

    def log(record):
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    first = {}
    if start == 0 and sets:
        first = evaluate(model, tok, sets, cfg, ctx)
        log({"step": 0, **first})
        if main_rank:
            print("before training: " + " | ".join(f"{k}={v:.3f}" for k, v in first.items()),
                  flush=True)
    t_start, last, skips = time.time(), {}, 0
    for step in range(start + 1, cfg.steps + 1):
        t0, sw = time.time(), Stopwatch(ctx.device)
        with autocast(cfg.dtype, ctx):
            if cfg.algo == "sft":
                m = sft_step(model, opt, sft_batch(examples, step, tok, cfg, ctx), cfg, ctx, step)
            else:
                with sw("rollout"):
                    b = collect(model, tok, examples, step, cfg, ctx, gen)
                m = train_step(model, opt, teacher, ref, b, cfg, ctx, step, sw)
                m.update(rollout_stats(b, ctx))
        m["step_time_s"] = time.time() - t0
        m.update({f"time_{k}_s": v for k, v in sw.times.items()})
        if sets and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            m.update(evaluate(model, tok, sets, cfg, ctx))  # greedy: consumes no RNG
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
            ckpt.save(model, opt, teacher, tok, gen, cfg, ctx, step)
    if main_rank and first and last:
        print("after training:  " + " | ".join(f"{k}={last[k]:.3f}" for k in first if k in last),
              flush=True)
    return {"before": first, "after": last}


def main(argv=None):
    cfg = parse_config(argv)
    ctx = setup_distributed()
    try:
        train(cfg, ctx)
    except (data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if ctx.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
