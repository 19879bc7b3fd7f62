"""One training loop for every algorithm: `python train.py` on a laptop, `torchrun` on nodes.

`train_step` is one optimizer step of every algorithm, as numbered steps:
    1 sample      G responses per prompt with the KV cache            engine/batch.py sample
    2 reward      the reward function on each response (DAPO: re-roll) sample, dapo_resample
    3 advantages  group-relative, (r - mean) / std or r - mean        grpo.group_advantages
    4 teacher     each row's privileged prompt, the distilled rows    `privileged` (below)
    5 score       no-grad log-probs of the sampled tokens under the teacher (RLSD, OPD), the
                  KL reference, and the rollout policy (several updates)  teachers.score_batch
    6 loss        per micro-batch, per chunk of positions: `update_mini_batch`, then
                  engine/losses.py backward_chunked -> chunk_loss -> the algorithm's function
    7 update      clip the global gradient norm, AdamW (6-7 once per mini-batch of prompts,
                  one by default, and per --ppo-epochs pass)     engine/update.clip_and_step
    8 teacher     sync / EMA the teacher toward the student           Teacher.update
`setup` loads the data, the student (a model directory or the toy warm start), the teachers
and the optimizer, and resumes; `loop` runs the steps. RLSD's path, each a direct call:
train_step -> update_mini_batch -> losses.backward_chunked -> losses.chunk_loss ->
losses.rlsd_chunk_loss -> rlsd.rlsd_loss -> rlsd.rlsd_token_advantages (Eqs. 13-15).
"""
import contextlib
import dataclasses
import sys
import time
from functools import partial

import torch

import data
import distill
import grpo
from engine import batch as rollouts, checkpoint as ckpt, losses, rewards, vision
from engine.config import Config, parse_config
from engine.distributed import (Dist, Stopwatch, autocast, release_large_blocks,
                                setup_distributed, teardown)
from engine.lora import add_lora, is_lora
from engine.prompts import fit_to_context, prompts_for
from engine.replay import Replay
from engine.rollout import checkpoint_layers, end_ids
from engine.rundir import (RunGuard, RunLog, StopSignals, Stopped, claim_run_dir, exits,
                           log_line, writing)
from engine.teachers import (Teacher, check_row_teachers, check_student, column_chunks,
                             external_teacher, score_batch, teacher_and_reference, teacher_specs)
from engine.toy import demos
from engine.toy.tasks import load_data
from engine.toy.warmstart import load_policy, overview, toy_checkpoint
from engine.trackers import Trackers
from engine.update import (Displacement, Metrics, clip_and_step, lr_at, micro_batches,
                           rollout_mini_batches, step_metrics, updates_per_batch)
from eval import eval_due, eval_sets, evaluate, evaluation_plan
from rlsd import lambda_schedule


# ----------------------------------------------------------------------------------------
# One RL / distillation step
# ----------------------------------------------------------------------------------------

def train_step(model, opt, *, tok, teacher: Teacher, ref, examples, step: int, cfg: Config,
               dist: Dist, gen: torch.Generator, sw: Stopwatch, replay: Replay | None = None):
    """One optimizer step of `cfg.algo`, steps 1-8 of the module docstring. Returns the step's
    metrics (means over all ranks) and its Batch. `replay`: --rollout-refresh's rollouts."""
    # this rank's prompts: a function of (seed, step), so a resumed run sees the same data;
    # rows p*G .. p*G+G-1 are prompt p's group: every group statistic assumes this layout
    prompts = data.step_examples(examples, step, prompts_per_step=cfg.prompts_per_step,
                                 seed=cfg.seed, rank=dist.rank, world=dist.world)
    exs = [e for e in prompts for _ in range(cfg.group_size)]
    with sw("rollout"):
        b = sample_batch(model, tok, exs, cfg=cfg, gen=gen, dist=dist, step=step,
                         replay=replay)  # 1-2. sample, reward
        # 3. advantages: within each group, so a group of equal rewards gets exactly 0 (it
        # says nothing about which response is better). Groups never straddle ranks.
        b.adv = grpo.group_advantages(b.rewards, cfg.group_size, scale=cfg.adv_scale)  # (N,)
        if teacher.mode != "none":  # 4. the teachers' prompts, and the rows they distil
            privileged(b, tok, examples, step=step, cfg=cfg, dist=dist)
        passes = {"rollout, student, reference": b.prompt_ids, "teacher": b.teacher_ids}
        media = rollouts.check_same_media(b, tok, {k: v for k, v in passes.items()
                                                   if v is not None}, dist) if b.media else {}
    model.train()
    ends = end_ids(cfg.eos_ids, model, tok)  # equivalent end tokens: one stopping action
    with sw("teacher"):  # 5. no-grad log-probs of the sampled tokens, once per step
        score_batch(b, model, teacher, ref, teacher_logp=cfg.algo in losses.SAMPLED_TOKEN_TEACHER,
                    ref_logp=cfg.kl_coef > 0, old_logp=updates_per_batch(
                        cfg.prompts_per_step, cfg.mini_batch_size, cfg.ppo_epochs) > 1,
                    temperature=cfg.temperature, rows=cfg.micro_batch_size,
                    logit_chunk=cfg.logit_chunk, eos_ids=ends)

    # 6-7. loss, backward and update, once per mini-batch of prompts (--mini-batch-size,
    # verl's ppo_mini_batch_size) and per pass over the batch (--ppo-epochs); one mini-batch
    # and one pass, the default, is one optimizer step per rollout batch
    opts, metrics, results = loss_options(cfg, step, ends), Metrics(), []
    lr = lr_at(step, lr=cfg.lr, warmup=cfg.lr_warmup_steps, schedule=cfg.lr_schedule,
               steps=cfg.steps)
    for _ in range(cfg.ppo_epochs):
        for mini in rollout_mini_batches(b, prompts=cfg.mini_batch_size,
                                         group_size=cfg.group_size, world=dist.world):
            results.append(update_mini_batch(model, opt, mini, cfg=cfg, opts=opts,
                                             teacher=teacher, lr=lr, dist=dist,
                                             metrics=metrics, sw=sw))
    # 8. teacher: sync (RLSD) on its schedule, EMA (SDPO, SRPO) once per rollout batch after
    # its updates, and only if one of them was taken (SDPO's update_policy, then the EMA)
    skipped = all(r["skipped"] for r in results)
    teacher.update(model, step, skipped=skipped)
    return {**step_metrics(b, results, metrics.means(dist), dist, skipped=skipped,
                           lam=opts.lam if opts.algo == "rlsd" else None), **media}, b


def sample_batch(model, tok, exs: list, *, cfg: Config, gen, dist: Dist, step: int = 0,
                 replay: Replay | None = None) -> rollouts.Batch:
    """Steps 1-2: one response per row (each prompt G times), rewarded; DAPO re-rolls the
    groups that carry no signal; `replay` (--rollout-refresh): an earlier student's rollouts.
    Our own KV-cache loop, exactly softmax(z / T) with our own generator: a run is
    reproducible and resumable to the bit on CPU."""
    model.eval()  # sampling is no-grad; eval() only matters for models with dropout
    kw = dict(prompts=prompts_for(cfg),
              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
              ignore_eos=cfg.ignore_eos, generation=cfg.generation,
              overlong_cache=cfg.overlong_cache, generator=gen, device=dist.device,
              top_k=cfg.rollout_top_k, top_p=cfg.rollout_top_p,
              reward=rewards.load_reward(cfg.reward), rows_per_pass=cfg.rollout_micro_batch)
    sample = partial(rollouts.sample, model, tok, **kw)
    if replay is not None:  # the rollout policy's, cached per prompt
        replay.before_step(step, model)
        b = replay.sample(partial(rollouts.sample, replay.policy, tok, **kw), exs,
                          cfg.group_size, tok=tok, prompts=kw["prompts"], device=dist.device)
    else:
        b = sample(exs)
    if cfg.algo == "dapo":  # dynamic sampling
        b = rollouts.dapo_resample(b, sample, group_size=cfg.group_size,
                                   rounds=cfg.dapo_max_gen_batches, pad_id=tok.pad_token_id)
    b.rewards, b.in_loss = b.rewards.to(dist.device), b.in_loss.to(dist.device)  # (N,)
    return b


def privileged(b, tok, examples: list, *, step: int, cfg: Config, dist: Dist):
    """Step 4: each row's teacher prompt (its student prompt plus the privileged context, then
    the SAME response ids) and the rows the distillation term averages over."""
    G = cfg.group_size
    shown = (rollouts.unrelated_contexts(b.examples, examples, group_size=G,
                                         seed=cfg.seed * 1_000_003 + step)
             if cfg.context_source == "other" else None)  # the study's control arm
    # SDPO's demonstration and SRPO's routing: a row's first correct sibling (SDPO
    # `_get_solution`; a row is never its own teacher), computed once
    to_sdpo, sibling = (distill.srpo_route(b.rewards.cpu(), G, threshold=cfg.success_threshold)
                        if cfg.context == "sibling" else (None, None))
    prompt = partial(rollouts.teacher_prompts, tok, b, context=cfg.context,
                     prompts=prompts_for(cfg), device=dist.device, shown=shown)
    if cfg.algo == "csd":  # T+ shown the first correct sibling, T- the first wrong one
        pos, neg = distill.csd_route(b.rewards.cpu(), G, threshold=cfg.success_threshold)
        b.teacher_ids, b.teacher_mask, has_pos = prompt(sibling=pos)
        b.neg_ids, b.neg_mask, has_neg = prompt(sibling=neg)
        b.has_context = b.distill = has_pos & has_neg  # rows with both teachers
        return
    b.teacher_ids, b.teacher_mask, b.has_context = prompt(sibling=sibling)
    b.distill, b.kl_off = losses.distilled_rows(cfg.algo, b, group_size=G, ptd_tau=cfg.ptd_tau,
                                                to_sdpo=to_sdpo)


def loss_options(cfg: Config, step: int, eos_ids: tuple = ()) -> losses.LossOptions:
    """The loss's hyperparameters at `step`. RLSD's lambda: 0.5 decaying linearly to 0 over 50
    steps, after which RLSD is GRPO; like the teacher's sync and the learning rate it counts
    rollout batches (verl's global step). `eos_ids`: the run's equivalent end ids."""
    lam = (lambda_schedule(step, lam0=cfg.lam0, warmup=cfg.lam_warmup, decay=cfg.lam_decay)
           if cfg.algo == "rlsd" else 0.0)
    own = ("lam", "dual_clip", "attract", "repel", "eos_ids")  # set here, not copied
    same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(losses.LossOptions)
            if f.name not in own}
    attract, repel = (float(x) for x in cfg.csd_balance.split(","))
    return losses.LossOptions(**same, lam=lam, attract=attract, repel=repel, eos_ids=eos_ids,
                              dual_clip=cfg.dual_clip if cfg.dual_clip > 0 else None)


def update_mini_batch(model, opt, b, *, cfg: Config, opts: losses.LossOptions,
                      teacher: Teacher, lr: float, dist: Dist, metrics: Metrics,
                      sw: Stopwatch) -> dict:
    """Steps 6-7 for one mini-batch `b`: the loss on each micro-batch of --micro-batch-size
    rows, a chunk of positions at a time, backward, then one AdamW step at `lr` with the
    gradient norm clipped. Every normaliser is the mini-batch's count over all micro-batches
    and ranks (losses.Norms), so the gradient does not depend on how the mini-batch is split.
    Returns {loss, grad_norm, skipped}."""
    norms = losses.global_norms(b, max_new_tokens=cfg.max_new_tokens, dist=dist)
    if b.distill is not None:  # --distill-agg as one weight per row, from the mini-batch's counts
        b.distill_w = losses.distill_row_weights(cfg.distill_agg, b, norms)
    mbs = micro_batches(b, cfg.micro_batch_size)
    chunks = [column_chunks(len(mb.examples), mb.resp_ids.shape[1], model, cfg.logit_chunk)
              for mb in mbs]
    with sw("teacher"):  # SRPO's and GSPO's pass over the whole mini-batch first
        losses.whole_batch_pass(model, teacher, mbs, chunks, norms, opts, dist=dist,
                                logit_chunk=cfg.logit_chunk)
    # 6. loss and backward a micro-batch at a time: the gradients accumulate in .grad, each
    # loss already divided by a global count
    loss_sum = 0.0
    for mb, ch in zip(mbs, chunks):
        t_hidden = None  # the teacher's hidden states: its whole next-token distribution
        if opts.algo in losses.DISTRIBUTION_TEACHER:
            with sw("teacher"):
                t_hidden = teacher.hidden(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids,
                                          mb.resp_mask, **mb.teacher_inputs(model))
        with sw("fwd_bwd"):
            loss_sum += losses.backward_chunked(model, mb, ch, norms=norms, opt=opts,
                                                world=dist.world, metrics=metrics,
                                                teacher=teacher, teacher_hidden=t_hidden)
    loss = dist.sum(loss_sum).item()  # the same global value on every rank
    # 7. clip the global gradient norm (after FSDP reduced the gradients: the full model's),
    # then AdamW; skipped if the loss or the norm is not finite
    with sw("optimizer"):
        grad_norm, skipped = clip_and_step(model, opt, loss=loss, lr=lr,
                                           max_grad_norm=cfg.max_grad_norm)
    return dict(loss=loss, grad_norm=grad_norm, skipped=skipped)


# ----------------------------------------------------------------------------------------
# Setup and the loop
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What the loop works with: the student, its tokenizer and optimizer, the teacher and the
    KL reference, the sampling generator, the data and evaluation sets, the step to start at."""
    model: torch.nn.Module
    tok: object
    opt: torch.optim.Optimizer
    teacher: Teacher
    ref: object
    gen: torch.Generator
    examples: list
    sets: dict
    start: int
    displacement: Displacement  # the param_displacement metric
    replay: Replay | None = None  # --rollout-refresh != 1: the rollout policy and its cache


def setup(cfg: Config, dist: Dist, stop: StopSignals) -> Run:
    """Data, the student, its teachers, the optimizer, and the resumed state."""
    torch.manual_seed(cfg.seed)
    columns = {c: getattr(cfg, c + "_key") for c in data.COLUMNS}  # --prompt-key etc.
    # OPSD's solution (or rationale) on every row; PTD-PO's hint on some (the others: not distilled)
    need = (cfg.context,) if cfg.context in ("solution", "rationale") else ()
    examples = load_data(cfg.data, "train", n_toy=20000, seed=cfg.seed, columns=columns,
                         need=need, fps=cfg.video_fps, audio_in_video=cfg.use_audio_in_video,
                         rationales=cfg.rationales)
    if cfg.context == "hint" and not any(e.hint for e in examples):
        raise data.DataError(f"{cfg.data}: no row has a '{cfg.hint_key}' value, and "
                             f"--algo {cfg.algo} distils toward the hint-conditioned teacher")
    if cfg.teacher_mode == "external":  # each row's teacher is one of --teacher's
        check_row_teachers(examples, [n for n, _ in teacher_specs(cfg.teacher)], cfg.teacher_key)
    sets = eval_sets(cfg, columns)  # loaded now: a bad eval file fails before any training
    with stop.now("the warm start"):  # minutes, once; a signal stops it at once
        model, tok = load_policy(cfg, dist, cfg.model)
    check_student(model, tok, examples + [e for s in sets.values() for e in s],
                  audio_in_video=cfg.use_audio_in_video, source=f"--model {cfg.model}")
    release_large_blocks(model, dist.device)  # CPU + wide vocabulary: chunks returned to the OS
    examples = fit_to_context(examples, cfg, model, tok, verbose=dist.rank == 0)  # named rows
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
    replay = (Replay(model, examples, refresh=cfg.rollout_refresh)  # Semi-OPD's rollouts
              if cfg.rollout_refresh != 1 else None)
    with stop.now("the warm start of the toy teacher"):  # OPD --teacher toy: a warm start too
        teacher, ref = teachers_for(cfg, model, tok, dist, also=replay and replay.policy)
    # AdamW over the (sharded) student's trainable weights only (with LoRA: the adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    # one sampling stream per rank (1_000_003 is a prime: ranks and seeds never share one)
    gen = torch.Generator(device=dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank)
    moved = Displacement(model)  # from the weights the run starts at, before a resume
    # resume restores what is not a function of (seed, step): weights, AdamW's moments, the
    # sampling RNG, the teacher's own weights (data order and schedules follow the step)
    start = ckpt.restore(model, opt, teacher, gen, cfg, dist) if cfg.resume else 0
    if replay is not None and cfg.resume:
        ckpt.restore_replay(replay, cfg, dist, start)
    return Run(model, tok, opt, teacher, ref, gen, examples, sets, start, moved, replay)


def teachers_for(cfg: Config, model, tok, dist: Dist, also=None):
    """(Teacher, KL reference or None), the student (and `also`) sharded with them under
    torchrun. OPD's --teacher: model directories, or 'toy' (SFT from a careful demonstrator)."""
    external = {}  # name -> model, each teacher loaded once; the first scores unnamed rows
    for name, path in teacher_specs(cfg.teacher) if cfg.teacher_mode == "external" else ():
        if path == "toy":
            path = toy_checkpoint(cfg, dist, steps=cfg.warm_start_steps, name="teacher", slip=0.0)
        external[name] = external_teacher(path, tok, flag=f"--teacher {name}", device=dist.device)
    return teacher_and_reference(
        model, mode=cfg.teacher_mode, kl_coef=cfg.kl_coef, sync_every=cfg.teacher_sync,
        ema_rate=cfg.teacher_ema, external=external or None, dist=dist, also=also,
        dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)


def one_step(r: Run, step: int, cfg: Config, dist: Dist) -> dict:
    """One optimizer step (RL, or SFT with --algo sft) and its wall times per phase."""
    t0, sw = time.time(), Stopwatch(dist.device)
    with autocast(cfg.dtype, dist):
        if cfg.algo == "sft":  # the toy warm start's step, on the data's demonstrations
            m = demos.sft_step_on(r.model, r.opt, r.examples, step, r.tok, cfg, dist)
        else:
            m, _ = train_step(r.model, r.opt, tok=r.tok, teacher=r.teacher, ref=r.ref,
                              examples=r.examples, step=step, cfg=cfg, dist=dist, gen=r.gen,
                              sw=sw, replay=r.replay)
    # wall time per phase (rollout, teacher, fwd_bwd, optimizer): tools/bench.py reads these
    return {**m, "param_displacement": r.displacement(dist), "step_time_s": time.time() - t0,
            **{f"time_{k}_s": v for k, v in sw.times.items()}}


def loop(r: Run, cfg: Config, dist: Dist, stop: StopSignals, run: RunLog) -> dict:
    """Evaluate, then the steps: each logged, checkpointed on its schedule, evaluated every
    --eval-every steps and after the last. During a step SIGTERM / Ctrl-C only set a flag: the
    step in progress finishes, so a checkpoint is never of a half-updated model and
    metrics.jsonl never has half a step (RunGuard: the checks between steps)."""
    def evaluated(when: str) -> dict:  # greedy decoding: never consumes the sampling RNG.
        # A signal stops it at once in one process; under torchrun the ranks finish together
        with stop.now(f"the evaluation {when}") if dist.world == 1 else contextlib.nullcontext():
            return evaluate(r.model, r.tok, r.sets, cfg, dist)

    if dist.rank == 0:
        print(evaluation_plan(r.sets, cfg, r.start), flush=True)
    first, last = {}, {}
    if r.start == 0 and r.sets:
        first = evaluated("before training")
        run.log({"step": 0, **first})
        run.show("before training", first)
    guard, t_start = RunGuard(cfg, stop, dist, r.start), time.time()
    for step in range(r.start + 1, cfg.steps + 1):  # steps count from 1, as in every paper
        m = one_step(r, step, cfg, dist)
        if r.sets and eval_due(step, cfg):
            try:
                m.update(evaluated(f"after step {step}"))
            except Stopped:  # the step itself is done: log it, save it if asked, stop
                pass
        last = {"step": step, **m}
        run.log(last)
        if dist.rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            log_line(step, cfg.steps, m, t_start)
        guard.check(step, m)  # many non-finite steps in a row stop the run
        if guard.save_due(step):
            ckpt.save(r.model, r.opt, r.teacher, r.tok, r.gen, cfg, dist, step, r.replay)
            guard.saved(step)
        guard.stop_if_signalled(step, sys.argv)
    guard.finish()
    if first and last:
        run.show("after training ", {k: last[k] for k in first if k in last})
    return {"before": first, "after": last}


def train(cfg: Config, dist: Dist) -> dict:
    """Claim --out, set up, run the loop; returns the metrics before and after training."""
    run_lock = claim_run_dir(cfg) if dist.rank == 0 else None  # refuse to clobber or share --out
    dist.barrier()
    # --report-to: TensorBoard / W&B / Trackio get what metrics.jsonl gets (rank 0 only)
    with writing(cfg.out, "the trackers' files (--report-to)"):
        tracker = Trackers(cfg) if dist.rank == 0 and cfg.report_to else None
    try:
        with StopSignals() as stop:
            r = setup(cfg, dist, stop)
            # I/O on rank 0 only; the other ranks wait at the barrier, so nobody races ahead
            # of a half-written config
            run = RunLog(cfg, r.start, tracker=tracker, main=dist.rank == 0)
            dist.barrier()
            result = loop(r, cfg, dist, stop, run)
        if dist.rank == 0:
            run.outputs(ckpt.latest_checkpoint(cfg.out), is_lora(r.model))
        return result
    finally:
        if tracker is not None:
            with writing(cfg.out, "the trackers' files (--report-to)"):
                tracker.close()
        if run_lock is not None:
            run_lock.close()  # releases the lock (a dead process releases it too)


def main(argv=None):
    # every flag is checked here, before anything is loaded: a typo costs a second, not the
    # minutes of a warm start followed by a traceback
    cfg, dist = parse_config(argv), None
    try:
        with exits(cfg.out):  # bad input: one line and exit 2; a signal: 128 + its number
            if cfg.dry_run:  # the model's size and memory per GPU from its config.json alone
                from engine import dryrun
                return dryrun.main(cfg)
            dist = setup_distributed()  # one process under python, one per GPU under torchrun
            if cfg.generation == "compiled" and dist.world > 1:  # FSDP hooks in a CUDA graph
                raise SystemExit("config error: --generation compiled runs in one process; "
                                 "under torchrun use --generation static or dynamic")
            if dist.rank == 0 and cfg.model == "toy" and cfg.algo != "sft" and not cfg.resume:
                print(overview(cfg), flush=True)
            train(cfg, dist)
            # every rank past its last collective before any of them tears the group down: a
            # rank that exits while a peer's gloo thread still talks to it can abort that peer
            dist.barrier()
    finally:
        if dist is not None:
            teardown(dist)


if __name__ == "__main__":
    main()
