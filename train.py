"""One training loop for every algorithm: `python train.py` on a laptop, `torchrun` on nodes.

    python train.py                                   # RLSD on the embedded toy task (CPU)
    python train.py --algo grpo --steps 100
    torchrun --nproc_per_node=8 train.py --algo rlsd --model Qwen/Qwen3-8B --data train.jsonl

How to read it: `train_step` is one optimizer step of every algorithm, as numbered steps
    1 sample      G responses per prompt with the KV cache            engine/batch.py sample
    2 reward      the reward function on each response (DAPO: re-roll) sample, dapo_resample
    3 advantages  group-relative, (r - mean) / std or r - mean        grpo.group_advantages
    4 teacher     each row's privileged prompt, the distilled rows    batch.teacher_prompts
    5 score       no-grad log-probs of the sampled tokens under the teacher (RLSD, OPD), the
                  KL reference and, with several updates, the rollout policy
                                                  engine/teachers.py sampled_token_logprobs
    6 loss        per micro-batch, per chunk of positions   update_mini_batch (below), then
                  engine/losses.py backward_chunked and chunk_loss (one branch per algorithm)
    7 update      clip the global gradient norm, AdamW (6-7 once per mini-batch of prompts,
                  one by default, and per --ppo-epochs pass)     engine/update.clip_and_step
    8 teacher     sync / EMA the teacher toward the student           Teacher.update
and `train` is the setup plus the loop around it. RLSD's path, from here to its idea:
train_step -> teachers.sampled_token_logprobs -> teachers.response_hidden (the teacher's
forward) -> update_mini_batch -> losses.backward_chunked -> losses.chunk_loss ->
rlsd.rlsd_loss -> rlsd._token_advantages. The options and each paper's defaults are in
engine/config.py and engine/defaults.py, the student's starting point (a model directory or
the toy warm start) in engine/toy/warmstart.py.
"""
import contextlib
import sys
import time
from functools import partial

import torch

import data
import grpo
from engine import batch as rollouts, checkpoint as ckpt, losses, rewards, vision
from engine.config import Config, parse_config
from engine.distributed import (Dist, Stopwatch, autocast, release_large_blocks,
                                setup_distributed, teardown)
from engine.lora import add_lora, is_lora
from engine.prompts import prompt_limit, prompts_for
from engine.rollout import checkpoint_layers, load_model
from engine.rundir import (RunLog, StopSignals, Stopped, claim_run_dir, log_line,
                           stopped_after, writing)
from engine.sft import sft_batch, sft_step
from engine.teachers import (Teacher, check_logits, column_chunks, sampled_token_logprobs,
                             teacher_and_reference)
from engine.toy.tasks import load_data
from engine.toy.warmstart import load_policy, overview, toy_checkpoint
from engine.trackers import Trackers
from engine.update import (Metrics, clip_and_step, lr_at, micro_batches, rollout_mini_batches,
                           updates_per_batch)
from eval import eval_sets, evaluate, evaluation_plan
from rlsd import lambda_schedule



# ----------------------------------------------------------------------------------------
# The external teacher
# ----------------------------------------------------------------------------------------

def external_teacher(cfg: Config, tok, dist: Dist, build=None):
    """OPD's external teacher (--teacher), loaded and checked, or None for a self-teacher.
    'toy' is the stronger toy teacher: the same SFT from a careful demonstrator, trained by
    `build` (the loop) and cached like the student's warm start."""
    if cfg.teacher_mode != "external":
        return None
    name = cfg.teacher
    if name == "toy":
        name = toy_checkpoint(cfg, dist, steps=cfg.warm_start_steps, name="teacher", slip=0.0,
                              build=build)
    model, t_tok = load_model(name, device=dist.device)
    check_logits(model, f"--teacher {cfg.teacher}")
    if len(t_tok) != len(tok):
        raise SystemExit(f"--teacher {cfg.teacher}: vocabulary of {len(t_tok)} tokens, the "
                         f"student has {len(tok)}; OPD needs a shared tokenizer")
    return model


def teachers_for(cfg: Config, model, tok, dist: Dist, build=None):
    """(Teacher, KL reference or None) of this run (teachers.teacher_and_reference), the
    student sharded with them under torchrun."""
    return teacher_and_reference(
        model, mode=cfg.teacher_mode, kl_coef=cfg.kl_coef, sync_every=cfg.teacher_sync,
        ema_rate=cfg.teacher_ema, external=external_teacher(cfg, tok, dist, build), dist=dist,
        dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)


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
    # the teacher (RLSD's evidence, OPD's advantage), under the KL reference and, when the
    # batch is updated in several steps, under the rollout policy (the PPO ratio's "old"
    # policy). With one update per batch the old policy IS the current one: the loss uses its
    # own log-probs, detached (losses.py), and this pass is not needed. (N, T) tensors, one
    # forward per micro-batch (--micro-batch-size rows) and the loss's own LM-head chunks
    model.train()
    score = dict(temperature=T, rows=cfg.micro_batch_size, logit_chunk=cfg.logit_chunk,
                 media=b.media)  # images, video, audio: the same for every forward
    with sw("teacher"):
        if cfg.algo in losses.SAMPLED_TOKEN_TEACHER:  # the teacher's prompt, the same tokens
            b.teacher_logp = sampled_token_logprobs(teacher.scorer(model), b.teacher_ids,
                                                    b.teacher_mask, b.resp_ids, b.resp_mask,
                                                    **score)
        if cfg.kl_coef > 0:
            b.ref_logp = sampled_token_logprobs(ref, b.prompt_ids, b.prompt_mask, b.resp_ids,
                                                b.resp_mask, **score)
        if updates_per_batch(cfg.prompts_per_step, cfg.mini_batch_size, cfg.ppo_epochs) > 1:
            # before the first update: the rollout policy
            b.old_logp = sampled_token_logprobs(model, b.prompt_ids, b.prompt_mask, b.resp_ids,
                                                b.resp_mask, **score)
    # RLSD's lambda: 0.5 decaying linearly to 0 over 50 steps, after which RLSD is GRPO. Like
    # the teacher's sync and the learning rate it counts rollout batches (verl's global step)
    lam = lambda_schedule(step, lam0=cfg.lam0, warmup=cfg.lam_warmup,
                          decay=cfg.lam_decay) if cfg.algo == "rlsd" else 0.0
    # each algorithm's loss on a chunk of positions (losses.py), with this run's options
    loss_of = partial(losses.chunk_loss, algo=cfg.algo, lam=lam, temperature=T,
                      clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                      kl_coef=cfg.kl_coef, loss_agg=cfg.loss_agg, eps_w=cfg.eps_w,
                      opd_coef=cfg.opd_coef, beta=cfg.beta, top_k=cfg.top_k,
                      token_clip=cfg.token_clip, is_clip=cfg.is_clip, srpo_beta=cfg.srpo_beta,
                      ptd_coef=cfg.ptd_coef, ptd_divergence=cfg.ptd_divergence)

    # 6-7. loss, backward and update, once per mini-batch of prompts (--mini-batch-size,
    # verl's ppo_mini_batch_size) and per pass over the batch (--ppo-epochs); one mini-batch
    # and one pass, the default, is one optimizer step per rollout batch
    metrics, results = Metrics(), []
    for _ in range(cfg.ppo_epochs):
        for mini in rollout_mini_batches(b, prompts=cfg.mini_batch_size,
                                         group_size=cfg.group_size, world=dist.world):
            results.append(update_mini_batch(
                model, opt, mini, loss_of=loss_of, teacher=teacher, algo=cfg.algo,
                distill_agg=cfg.distill_agg, srpo_beta=cfg.srpo_beta, temperature=T,
                rows=cfg.micro_batch_size, logit_chunk=cfg.logit_chunk,
                max_new_tokens=cfg.max_new_tokens, max_grad_norm=cfg.max_grad_norm,
                lr=lr_at(step, lr=cfg.lr, warmup=cfg.lr_warmup_steps,
                         schedule=cfg.lr_schedule, steps=cfg.steps),
                dist=dist, metrics=metrics, sw=sw))
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


def update_mini_batch(model, opt, b, *, loss_of, teacher: Teacher, algo: str, distill_agg: str,
                      srpo_beta: float, temperature: float, rows: int, logit_chunk: int,
                      max_new_tokens: int, max_grad_norm: float, lr: float, dist: Dist,
                      metrics: Metrics, sw: Stopwatch) -> dict:
    """Steps 6-7 for one mini-batch `b`: `loss_of` (losses.chunk_loss with the run's options)
    on each micro-batch of `rows` rows, a chunk of positions at a time, backward, then one
    AdamW step at `lr` with the gradient norm clipped to `max_grad_norm`. Every normaliser is
    the mini-batch's count over all micro-batches and ranks (losses.Norms), so the gradient
    does not depend on how the mini-batch is split. Returns {loss, grad_norm, skipped}."""
    norms = losses.global_norms(b, max_new_tokens=max_new_tokens, dist=dist)  # all-reduced once
    if b.distill is not None:  # --distill-agg as one weight per row, from the mini-batch's counts
        b.distill_w = losses.distill_row_weights(distill_agg, b, norms)
    mbs = micro_batches(b, rows)
    chunks = [column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, logit_chunk)
              for mb in mbs]
    if algo == "srpo":  # pass 1 of its entropy-weight normaliser: a whole-batch mean
        with sw("teacher"):
            norms.w_mean = losses.srpo_weight_mean(model, teacher, mbs, chunks,
                                                   srpo_beta=srpo_beta,
                                                   temperature=temperature, dist=dist)
    if algo == "gspo" and b.old_logp is not None:  # each row's ratio, before its chunks
        with sw("teacher"):
            losses.gspo_sequence_ratios(model, mbs, temperature=temperature,
                                        logit_chunk=logit_chunk)

    # 6. loss and backward, a micro-batch at a time and a chunk of positions at a time. The
    # gradients of the micro-batches accumulate in .grad; nothing is averaged per micro-batch,
    # because every loss is already divided by a global count (Norms)
    loss_sum = 0.0
    for mb, ch in zip(mbs, chunks):
        t_hidden = None  # the teacher's hidden states: its whole next-token distribution
        if algo in losses.DISTRIBUTION_TEACHER:
            with sw("teacher"):
                t_hidden = teacher.hidden(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids,
                                          mb.resp_mask, **mb.teacher_inputs(model))
        with sw("fwd_bwd"):
            loss_sum += losses.backward_chunked(
                model, mb, ch, partial(loss_of, norms=norms), world=dist.world,
                metrics=metrics, temperature=temperature, teacher=teacher,
                teacher_hidden=t_hidden)
    loss = dist.sum(loss_sum).item()  # the same global value on every rank

    # 7. update: clip the global gradient norm (after FSDP has reduced the gradients, so the
    # norm is the full model's), then AdamW; skipped if the loss or the norm is not finite
    with sw("optimizer"):
        grad_norm, skipped = clip_and_step(model, opt, loss=loss, lr=lr,
                                           max_grad_norm=max_grad_norm)
    return dict(loss=loss, grad_norm=grad_norm, skipped=skipped)


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
    examples = load_data(cfg.data, "train", n_toy=20000, seed=cfg.seed, columns=columns,
                         need=need, fps=cfg.video_fps, audio_in_video=cfg.use_audio_in_video)
    if cfg.context == "hint" and not any(e.hint for e in examples):
        raise data.DataError(f"{cfg.data}: no row has a '{cfg.hint_key}' value, and "
                             f"--algo {cfg.algo} distils toward the hint-conditioned teacher")
    sets = eval_sets(cfg, columns)  # loaded now: a bad eval file fails before any training
    # the toy warm start (minutes, once): a signal stops it at once, it has nothing to save
    with stop.now("the warm start"):
        model, tok = load_policy(cfg, dist, cfg.model, build=partial(train, stop=stop))
    check_logits(model, f"--model {cfg.model}")  # losses and samples see the same logits
    try:  # audio for a model without an audio tower, images for a text model
        vision.check_model(tok, examples + [e for s in sets.values() for e in s],
                           audio_in_video=cfg.use_audio_in_video, source=f"--model {cfg.model}")
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
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

    if cfg.freeze_vision or cfg.freeze_towers:  # before the teachers copy it and sharding
        try:
            vision.freeze_towers(model, f"--model {cfg.model}", audio=cfg.freeze_towers)
        except ValueError as e:
            raise SystemExit(f"config error: {e}") from None
    if cfg.gradient_checkpointing:  # before the teachers copy it: they run without grad anyway
        checkpoint_layers(model)
    if cfg.lora_rank:  # adapters on the loaded weights; a resumed run loads its own below
        model = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                         dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    with stop.now("the warm start of the toy teacher"):  # OPD --teacher toy: a warm start too
        teacher, ref = teachers_for(cfg, model, tok, dist, build=partial(train, stop=stop))
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
    # half-written config
    run = RunLog(cfg, start, tracker=tracker, main=main_rank, label=label)
    dist.barrier()

    def evaluated(when: str) -> dict:  # a signal during evaluation stops it at once (one
        # process: the processes of torchrun evaluate together, and one that left early would
        # hang the others' all-reduce; there the evaluation ends first)
        with stop.now(f"the evaluation {when}") if dist.world == 1 else contextlib.nullcontext():
            return evaluate(model, tok, sets, cfg, dist)

    if main_rank and not label:
        print(evaluation_plan(sets, cfg, start), flush=True)
    first = {}
    if start == 0 and sets:  # greedy decoding: evaluation never consumes the sampling RNG
        first = evaluated("before training")
        run.log({"step": 0, **first})
        run.show("before training", first)
    t_start, last, skips, warned, saved = time.time(), {}, 0, False, start
    # during a step SIGTERM / Ctrl-C only set a flag: the step in progress finishes, so a
    # checkpoint is never of a half-updated model and metrics.jsonl never has half a step
    for step in range(start + 1, cfg.steps + 1):  # steps count from 1, as in every paper
        t0, sw = time.time(), Stopwatch(dist.device)
        with autocast(cfg.dtype, dist):
            if cfg.algo == "sft":
                b = sft_batch(examples, step, tok, prompts=prompts_for(cfg), data_spec=cfg.data,
                              per_step=cfg.prompts_per_step, seed=cfg.seed, slip=cfg.demo_slip,
                              dist=dist)
                m = sft_step(model, opt, b, rows=cfg.micro_batch_size,
                             logit_chunk=cfg.logit_chunk, max_grad_norm=cfg.max_grad_norm,
                             lr=lr_at(step, lr=cfg.lr, warmup=cfg.lr_warmup_steps,
                                      schedule=cfg.lr_schedule, steps=cfg.steps), dist=dist)
            else:
                m, _ = train_step(model, opt, tok=tok, teacher=teacher, ref=ref,
                                  examples=examples, step=step, cfg=cfg, dist=dist, gen=gen,
                                  sw=sw)
        # wall time per phase (rollout, teacher, fwd_bwd, optimizer): tools/bench.py reads these
        m["step_time_s"] = time.time() - t0
        m.update({f"time_{k}_s": v for k, v in sw.times.items()})
        # evaluate every --eval-every steps and after the last one
        if sets and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            try:  # greedy: consumes no RNG
                m.update(evaluated(f"after step {step}"))
            except Stopped:  # the step itself is done: log it, save it if asked, stop
                pass
        last = {"step": step, **m}
        run.log(last)
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
            name = stop.name or "SIGTERM"  # the signal reached another rank
            raise Stopped(name, stopped_after(step, saved, cfg.out, name, sys.argv))
    if first and last:
        run.show("after training ", {k: last[k] for k in first if k in last})
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
        from engine import dryrun
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
        # every rank past its last collective before any of them tears the group down: a rank
        # that exits while a peer's gloo thread still talks to it can abort that peer
        dist.barrier()
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
