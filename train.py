"""One training loop for every algorithm: `python train.py` on a laptop, `torchrun` on nodes.

    python train.py                                   # RLSD on the embedded toy task (CPU)
    python train.py --algo grpo --steps 100
    torchrun --nproc_per_node=8 train.py --algo rlsd --model Qwen/Qwen3-8B --data train.jsonl

How to read it: `train_step` is one optimizer step of every algorithm, as numbered steps
    1 sample      G responses per prompt with the KV cache            batch.sample
    2 reward      the reward function on each response (DAPO: re-roll) batch.sample, dapo_resample
    3 advantages  group-relative, (r - mean) / std or r - mean        grpo.group_advantages
    4 teacher     each row's privileged prompt, the distilled rows    batch.teacher_prompts
    5 score       no-grad log-probs of the sampled tokens under the teacher (RLSD, OPD), the
                  KL reference and, with several updates, the rollout policy   teachers.py
    6 loss        per micro-batch, per chunk of positions             losses.chunk_loss
    7 update      clip the global gradient norm, AdamW (6-7 once per mini-batch of prompts,
                  one by default, and per --ppo-epochs pass)   update.update_mini_batch
    8 teacher     sync / EMA the teacher toward the student           teachers.Teacher.update
and `train` is the setup plus the loop around it. What each algorithm does differently is in
losses.py (one branch each); the options and each paper's defaults are in config.py, the
student's starting point (a model directory or the toy warm start) in warmstart.py.
"""
import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from functools import partial

import torch

import batch as rollouts
import checkpoint as ckpt
import data
import grpo
import losses
import rewards
import vision
from config import Config, parse_config
from distributed import (Dist, Stopwatch, autocast, release_large_blocks, setup_distributed,
                         shard, teardown)
from eval import eval_sets, evaluate, evaluation_plan
from prompts import prompt_limit, prompts_for
from lora import BaseView, add_lora, is_lora
from rlsd import lambda_schedule
from rollout import checkpoint_layers, load_model
from rundir import StopSignals, Stopped, claim_run_dir, log_line, start_metrics_log, writing
from teachers import Teacher, check_logits, chunked_logits, sampled_token_logprobs
from trackers import Trackers
from update import (Metrics, column_chunks, micro_batches, rollout_mini_batches,
                    update_mini_batch, updates_per_step)
from warmstart import load_policy, overview, sft_batch, sft_step, toy_checkpoint



# ----------------------------------------------------------------------------------------
# Models: the cached toy warm start, the student, teachers
# ----------------------------------------------------------------------------------------

def teacher_and_reference(cfg: Config, model, tok, dist: Dist, build=None):
    """(Teacher, KL reference or None), and the student sharded with them under torchrun.

    The teacher's own weights (frozen, sync, ema, trust) and the reference are copies of the
    initial student. The reference is never the same object as a teacher that moves (sync,
    EMA; audit F10): then it gets a copy of its own. With LoRA the initial student is the
    student with its adapters off (lora.BaseView), so a frozen or trust-region teacher and
    the reference cost no copy at all. `build`: the loop that trains a toy teacher (train)."""
    # copies are made BEFORE sharding: each copy is then sharded like the student, so a sync or
    # an EMA update is a parameter-by-parameter operation between identically sharded models
    base = BaseView(model) if is_lora(model) else None
    moving = cfg.teacher_mode in ("sync", "ema")  # teachers whose weights leave theta_0
    initial = None
    if cfg.teacher_mode in ("frozen", "trust", "sync", "ema"):
        initial = copy.deepcopy(model) if (moving or base is None) else base
    ref = None
    if cfg.kl_coef > 0:
        # a frozen teacher IS the initial model, so the reference may share its weights; a
        # sync or EMA teacher moves away from it, and the KL must stay anchored at theta_0
        if base is not None:
            ref = base
        else:
            ref = initial if (initial is not None and not moving) else copy.deepcopy(model)
    if cfg.teacher_mode == "external":
        name = cfg.teacher
        if name == "toy":  # a stronger toy teacher: the same SFT from a careful demonstrator
            name = toy_checkpoint(cfg, dist, steps=cfg.warm_start_steps, name="teacher",
                                  slip=0.0, build=build)
        initial, t_tok = load_model(name, device=dist.device)
        check_logits(initial, f"--teacher {cfg.teacher}")
        if len(t_tok) != len(tok):
            raise SystemExit(f"--teacher {cfg.teacher}: vocabulary of {len(t_tok)} tokens, "
                             f"the student has {len(tok)}; OPD needs a shared tokenizer")
    # bf16 compute, float32 master weights (FSDP's mixed precision; autocast in one process)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    modules = [x for x in (model, initial, ref) if isinstance(x, torch.nn.Module)]
    for m in {id(x): x for x in modules}.values():  # each once
        shard(m, dist, dtype)
    teacher = Teacher(cfg.teacher_mode, initial, sync_every=cfg.teacher_sync,
                      ema_rate=cfg.teacher_ema)
    return teacher, ref


# ----------------------------------------------------------------------------------------
# One RL / distillation step
# ----------------------------------------------------------------------------------------

def train_step(model, opt, *, tok, teacher: Teacher, ref, examples, step: int, cfg: Config,
               dist: Dist, gen: torch.Generator, sw: Stopwatch):
    """One optimizer step of `cfg.algo`, steps 1-8 of the module docstring. Returns the step's
    metrics (means over all ranks) and its Batch."""
    reward = rewards.load_reward(cfg.reward)  # --reward: a function of (response, answer, ...)
    G, T = cfg.group_size, cfg.temperature  # T: the rollout temperature, also every loss's
    prompter = prompts_for(cfg)  # templates, system prompt, chat-template options
    # this rank's prompts: a function of (seed, step), so a resumed run sees the same data
    prompts = data.step_examples(examples, step, prompts_per_step=cfg.prompts_per_step,
                                 seed=cfg.seed, rank=dist.rank, world=dist.world)
    # rows p*G .. p*G+G-1 are prompt p's group: every group statistic (advantages, siblings,
    # PTD-PO's group accuracy) assumes this layout
    exs = [e for e in prompts for _ in range(G)]

    # 1-2. sample G responses per prompt and score them with the reward function
    model.eval()  # sampling is no-grad; eval() only matters for models with dropout
    sample = partial(rollouts.sample, model, tok, prompts=prompter,
                     max_new_tokens=cfg.max_new_tokens, temperature=T, ignore_eos=cfg.ignore_eos,
                     generation=cfg.generation, overlong_cache=cfg.overlong_cache, generator=gen,
                     device=dist.device, top_k=cfg.rollout_top_k, top_p=cfg.rollout_top_p,
                     reward=reward, rows_per_pass=cfg.rollout_micro_batch)
    with sw("rollout"):
        # our own KV-cache loop, exactly softmax(z / T) over the full vocabulary with our own
        # generator, so a run is reproducible and resumable to the bit on CPU
        b = sample(exs)
        if cfg.algo == "dapo":  # dynamic sampling: re-roll groups that carry no signal
            b = rollouts.dapo_resample(b, sample, group_size=G, rounds=cfg.dapo_max_gen_batches,
                                       pad_id=tok.pad_token_id)
        b.rewards, b.in_loss = b.rewards.to(dist.device), b.in_loss.to(dist.device)  # (N,)

        # 3. advantages: within each group, so a group of equal rewards gets exactly 0 (it
        # says nothing about which response is better). Groups never straddle ranks.
        b.adv = grpo.group_advantages(b.rewards, G, scale=cfg.adv_scale)  # (N,)

        # 4. teacher prompts: the student prompt plus the privileged context, then the SAME
        # response ids; and which rows the distillation term averages over
        if teacher.mode != "none":
            shown = (rollouts.unrelated_contexts(b.examples, examples, group_size=G,
                                                 seed=cfg.seed * 1_000_003 + step)
                     if cfg.context_source == "other" else None)  # the study's control arm
            b.teacher_ids, b.teacher_mask, b.has_context = rollouts.teacher_prompts(
                tok, b, context=cfg.context, prompts=prompter, group_size=G,
                success_threshold=cfg.success_threshold, device=dist.device, shown=shown)
            b.distill, b.kl_off = losses.distilled_rows(
                cfg.algo, b, group_size=G, success_threshold=cfg.success_threshold,
                ptd_tau=cfg.ptd_tau)

    # 5. score, without gradient and once per step: the log-probs of the sampled tokens under
    # the teacher (RLSD's evidence, OPD's advantage), under the KL reference, and, when the
    # batch is updated in several steps, under the rollout policy (the PPO ratio's "old"
    # policy). With one update per batch the old policy IS the current one: the loss uses its
    # own log-probs, detached (losses.py), and this pass is not needed.
    model.train()
    mbs = micro_batches(b, cfg.micro_batch_size)  # rows per forward: bounds activation memory
    chunks = [column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, cfg.logit_chunk)
              for mb in mbs]  # the loss uses the same chunks, so the numbers are identical
    with sw("teacher"):
        # (N, T) tensors, one forward per micro-batch and no gradient: the teacher is data,
        # never trained, exactly like the KL reference (and cheaper than recomputing it in the
        # checkpointed loss, which is what a closure inside the loss would do)
        def scored(logits_of):  # (N, T): one forward per micro-batch, the loss's own chunks
            return torch.cat([sampled_token_logprobs(logits_of(mb), mb.resp_ids, temperature=T,
                                                     chunks=ch) for mb, ch in zip(mbs, chunks)])
        if cfg.algo in losses.SAMPLED_TOKEN_TEACHER:
            b.teacher_logp = scored(lambda mb: teacher.logits(
                model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids, mb.resp_mask,
                **mb.teacher_inputs(model)))  # images: the same as the student's ({} for text)
        if cfg.kl_coef > 0:
            b.ref_logp = scored(lambda mb: chunked_logits(
                ref, mb.prompt_ids, mb.prompt_mask, mb.resp_ids, mb.resp_mask,
                **mb.student_inputs(ref)))
        if updates_per_step(cfg) > 1:  # before the first update: the rollout policy
            b.old_logp = scored(lambda mb: chunked_logits(
                model, mb.prompt_ids, mb.prompt_mask, mb.resp_ids, mb.resp_mask,
                **mb.student_inputs(model)))
    # RLSD's lambda: 0.5 decaying linearly to 0 over 50 steps, after which RLSD is GRPO. Like
    # the teacher's sync and the learning rate it counts rollout batches (verl's global step)
    lam = lambda_schedule(step, lam0=cfg.lam0, warmup=cfg.lam_warmup,
                          decay=cfg.lam_decay) if cfg.algo == "rlsd" else 0.0

    # 6-7. loss, backward and update, once per mini-batch of prompts (--mini-batch-size,
    # verl's ppo_mini_batch_size) and per pass over the batch (--ppo-epochs); one mini-batch
    # and one pass, the default, is one optimizer step per rollout batch
    metrics, results = Metrics(), []
    for _ in range(cfg.ppo_epochs):
        for mini in rollout_mini_batches(b, cfg, dist):
            results.append(update_mini_batch(model, opt, teacher, mini, cfg, dist, step, lam,
                                             metrics, sw))
    # 8. teacher: sync (RLSD) on its schedule, EMA (SDPO, SRPO) once per rollout batch after
    # its updates, and only if one of them was taken (SDPO's update_policy, then the EMA)
    skipped = all(r["skipped"] for r in results)
    teacher.update(model, step, skipped=skipped)
    loss = sum(r["loss"] for r in results) / len(results)
    grad_norm = sum(r["grad_norm"] for r in results) / len(results)

    # metrics: each a mean over its own tokens or rows, over all ranks
    out = metrics.means(dist)
    n = dist.sum(len(b.examples)).item()  # rows over all ranks
    out.update(loss=loss, grad_norm=grad_norm, skipped=float(skipped),
               tokens=dist.sum(b.mask.sum()).item(),  # loss tokens of the whole batch
               updates=float(len(results)),
               reward_mean=dist.sum(b.rewards.sum()).item() / n,
               correct_frac=dist.sum(b.correct.float().sum()).item() / n,
               response_len_mean=dist.sum(b.resp_mask.sum()).item() / n,
               truncated_frac=dist.sum(b.truncated.sum()).item() / n)
    if cfg.algo == "rlsd":
        out["rlsd_lambda"] = lam
    if b.distill is not None:  # the share of rows the distillation term acted on
        out["distilled_frac"] = dist.sum(b.distill.float().sum()).item() / n
    return out, b


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def train(cfg: Config, dist: Dist, label: str = "", stop: StopSignals | None = None) -> dict:
    """Set up and run the loop; `label` prefixes the console lines (the warm start's). `stop`:
    the signal handling of an enclosing run (the warm start runs inside the student's)."""
    run_lock = claim_run_dir(cfg) if dist.rank == 0 else None  # refuse to clobber or share --out
    dist.barrier()
    # --report-to: TensorBoard / W&B / Trackio get what metrics.jsonl gets (rank 0 only)
    with writing(cfg.out, "the trackers' files (--report-to)"):
        tracker = Trackers(cfg) if dist.rank == 0 and cfg.report_to else None
    try:
        with (contextlib.nullcontext(stop) if stop is not None else StopSignals()) as stop:
            return _train(cfg, dist, label, stop, tracker)
    finally:
        if tracker is not None:
            with writing(cfg.out, "the trackers' files (--report-to)"):
                tracker.close()
        if run_lock is not None:
            run_lock.close()  # releases the lock (a dead process releases it too)


def _train(cfg: Config, dist: Dist, label: str, stop: StopSignals, tracker=None) -> dict:
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
    sets = eval_sets(cfg, columns)  # loaded now: a bad eval file fails before any training
    # the toy warm start (minutes, once): a signal stops it at once, it has nothing to save
    with stop.now("the warm start"):
        model, tok = load_policy(cfg, dist, cfg.model, build=partial(train, stop=stop))
    check_logits(model, f"--model {cfg.model}")  # losses and samples see the same logits
    release_large_blocks(model, dist.device)  # CPU + wide vocabulary: chunks returned to the OS
    # prompts longer than the model can answer fail here (naming the row), not after minutes
    # of training with a traceback about a 30 GB allocation
    limit = prompt_limit(cfg, model)
    if limit and cfg.data not in data.TASKS:  # the embedded tasks' prompts are short
        name = ("--max-prompt-tokens" if cfg.max_prompt_tokens else
                "the model's context minus --max-new-tokens =")
        examples = data.drop_long_prompts(examples, partial(prompts_for(cfg).student, tok),
                                          limit, cfg.long_prompts, source=cfg.data,
                                          verbose=main_rank, limit_name=name)

    if cfg.freeze_vision:  # before the teachers copy it and before sharding
        try:
            vision.freeze_vision_tower(model, f"--model {cfg.model}")
        except ValueError as e:
            raise SystemExit(f"config error: {e}") from None
    if cfg.gradient_checkpointing:  # before the teachers copy it: they run without grad anyway
        checkpoint_layers(model)
    if cfg.lora_rank:  # adapters on the loaded weights; a resumed run loads its own below
        model = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                         dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    with stop.now("the warm start of the toy teacher"):  # OPD --teacher toy: a warm start too
        teacher, ref = teacher_and_reference(cfg, model, tok, dist,
                                             build=partial(train, stop=stop))  # shards the student
    # AdamW over the (sharded) student's trainable weights only (with LoRA: the adapters):
    # teachers and the reference are never optimised
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    # one sampling stream per rank (1_000_003 is a prime: ranks and seeds never share one)
    gen = torch.Generator(device=dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank)
    # resume restores everything that is not a function of (seed, step): weights, AdamW's
    # moments, the sampling RNG, the teacher's own weights (the data order and every schedule
    # are functions of the step, so nothing else needs saving)
    start = ckpt.restore(model, opt, teacher, gen, cfg, dist) if cfg.resume else 0

    # I/O on rank 0 only; the other ranks wait at the barrier so nobody races ahead of a
    # half-written config. config.json is replaced atomically (write, then rename)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if main_rank:
        with writing(cfg.out, "config.json and metrics.jsonl"):
            with open(os.path.join(cfg.out, "config.json.tmp"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
            os.replace(os.path.join(cfg.out, "config.json.tmp"),
                       os.path.join(cfg.out, "config.json"))
            start_metrics_log(metrics_path, start)
    dist.barrier()

    def log(record):  # one JSON line per step, appended and flushed: a crash loses no step
        if main_rank:
            with writing(cfg.out, f"step {record['step']}'s metrics",
                         f"The checkpoints are intact (newest: {ckpt.latest_checkpoint(cfg.out)})"):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if tracker is not None:
                    tracker.log(record)

    def evaluated(when: str) -> dict:  # a signal during evaluation stops it at once (one
        # process: the processes of torchrun evaluate together, and one that left early would
        # hang the others' all-reduce; there the evaluation ends first)
        with stop.now(f"the evaluation {when}") if dist.world == 1 else contextlib.nullcontext():
            return evaluate(model, tok, sets, cfg, dist)

    def show(when, values):
        if main_rank:
            print(f"{label}{when}: " + " | ".join(f"{k}={v:.3f}" for k, v in values.items()),
                  flush=True)

    if main_rank and not label:
        print(evaluation_plan(sets, cfg, start), flush=True)
    first = {}
    if start == 0 and sets:  # greedy decoding: evaluation never consumes the sampling RNG
        first = evaluated("before training")
        log({"step": 0, **first})
        show("before training", first)
    t_start, last, skips, warned, saved = time.time(), {}, 0, False, start
    # during a step SIGTERM / Ctrl-C only set a flag: the step in progress finishes, so a
    # checkpoint is never of a half-updated model and metrics.jsonl never has half a step
    for step in range(start + 1, cfg.steps + 1):  # steps count from 1, as in every paper
        t0, sw = time.time(), Stopwatch(dist.device)
        with autocast(cfg.dtype, dist):
            if cfg.algo == "sft":
                m = sft_step(model, opt, sft_batch(examples, step, tok, cfg, dist), cfg, dist,
                             step)
            else:
                m, _ = train_step(model, opt, tok=tok, teacher=teacher, ref=ref,
                                  examples=examples, step=step, cfg=cfg, dist=dist, gen=gen,
                                  sw=sw)
        # wall time per phase (rollout, teacher, fwd_bwd, optimizer): bench.py reads these
        m["step_time_s"] = time.time() - t0
        m.update({f"time_{k}_s": v for k, v in sw.times.items()})
        # evaluate every --eval-every steps and after the last one
        if sets and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            try:  # greedy: consumes no RNG
                m.update(evaluated(f"after step {step}"))
            except Stopped:  # the step itself is done: log it, save it if asked, stop
                pass
        last = {"step": step, **m}
        log(last)
        if main_rank and (step % cfg.log_every == 0 or step == cfg.steps):
            log_line(step, cfg.steps, m, t_start, label)
        # most responses cut off at the limit: rewards are ~0 and nothing is learned; say so
        if main_rank and not warned and m.get("truncated_frac", 0) > 0.5:
            warned = True
            print(f"warning: {m['truncated_frac']:.0%} of the responses hit --max-new-tokens "
                  f"{cfg.max_new_tokens} (reward 0 without a final answer); raise it",
                  flush=True)
        # a NaN/inf step was skipped (weights untouched); many in a row mean the run is
        # broken, and going on would only burn compute
        skips = skips + 1 if m["skipped"] else 0
        if skips >= cfg.max_skips:  # the weights are untouched: the last checkpoint is good
            raise SystemExit(f"stopping at step {step}: {skips} consecutive steps with a "
                             f"non-finite loss or gradient norm (loss={m['loss']}, "
                             f"grad_norm={m['grad_norm']}); weights were not updated, the "
                             f"last checkpoint in {cfg.out} is intact. Lower --lr or check "
                             f"the data.")
        # a signal may reach one rank only: all-reduce it, so every rank stops at the same
        # step (a rank that carried on alone would hang in its next collective)
        signalled = dist.sum(float(stop.name is not None)).item() > 0
        if ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps
                or (signalled and cfg.save_on_signal)):
            ckpt.save(model, opt, teacher, tok, gen, cfg, dist, step)
            saved = step
        if signalled and step < cfg.steps:
            resume = " ".join(a for a in sys.argv if a not in ("--resume", "--overwrite"))
            raise Stopped(stop.name or "SIGTERM",
                          f"stopped after step {step} ({stop.name or 'signal'}); "
                          + (f"the newest checkpoint is step {saved} in {cfg.out}"
                             if saved else "no checkpoint was written")
                          + f"; continue with: python {resume} --resume"
                          + ("" if saved == step else " (steps after the checkpoint "
                             "are redone; --save-on-signal checkpoints the last one)"))
    if first and last:
        show("after training ", {k: last[k] for k in first if k in last})
    ck = ckpt.latest_checkpoint(cfg.out)
    if main_rank and not label and ck:
        print(f"outputs in {cfg.out}: metrics.jsonl (one line per step), config.json, {ck} (a "
              f"{'PEFT adapter' if is_lora(model) else 'Hugging Face model'} directory).\nnext: python eval.py {ck}   |   python eval.py "
              f"--compare {cfg.out} OTHER_RUN --plot cmp.png", flush=True)
    return {"before": first, "after": last}


def main(argv=None):
    # every flag is checked here, before anything is loaded: a typo costs a second, not the
    # minutes of a warm start followed by a traceback
    cfg = parse_config(argv)
    if cfg.dry_run:  # the model's size and memory per GPU from its config.json alone
        import dryrun
        try:
            return dryrun.main(cfg)
        except (data.DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
    dist = setup_distributed()  # one process under python, one per GPU (or core) under torchrun
    if cfg.generation == "compiled" and dist.world > 1:  # FSDP hooks in a CUDA graph: untested
        raise SystemExit("config error: --generation compiled runs in one process; under "
                         "torchrun use --generation static or dynamic")
    if dist.rank == 0 and cfg.model == "toy" and cfg.algo != "sft" and not cfg.resume:
        print(overview(cfg), flush=True)
    try:
        train(cfg, dist)
    # bad input ends in one line naming the file and row, never a traceback
    except (data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Stopped as e:  # preempted: 128 + the signal (143 SIGTERM, 130 Ctrl-C), not 1
        print(e.message if "after step" in e.message else
              f"{e.message}; no training step was cut short: run the same command again"
              + (" with --resume" if ckpt.latest_checkpoint(cfg.out) else ""), file=sys.stderr)
        raise SystemExit(e.status)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, mid-step
        print(f"\ninterrupted; the checkpoints in {cfg.out} are intact: continue with --resume",
              file=sys.stderr)
        raise SystemExit(130)
    finally:
        teardown(dist)


if __name__ == "__main__":
    main()
