"""What supervised fine-tuning learns from: each step's prompts and their targets.

On a data file, the student's prompt and the row's solution (or its bare answer). On an
embedded task, the mix of demonstrations its warm start imitates (`TOY_SFT_MIX`): most prompts
carry no context and their targets are a careless demonstrator's (arithmetic: dropped carries;
shapes: overlooked shapes; clips: silent seconds counted; chains: dropped carries, worded);
the others carry a privileged context (answer, solution, hint, rationale) and are worked
carefully (chains: a shown reference may be cited, chains.demonstration). So the one network
later acts as a student with a habit that a reward corrects, and as a teacher that reads the
context it is shown.
"""
import random

import data
from engine.prompts import prompts_for, render, templates
from engine.sft import sft_batch, sft_step
from engine.toy import arithmetic, chains, clips, shapes
from engine.update import lr_at

# 30% of the toy's prompts carry the answer, so that the same network later acts as a teacher
# that USES a privileged context (30%, not 20%: measured). Without a context the
# demonstrations drop 80% of the carries (--demo-slip, arithmetic.sloppy_solution); in a trial
# run 0.6 left the warm start nearer to where RL levels off, so less for RL to fix. On the
# shapes task the demonstrator overlooks that share of the right-hand column's shapes; on the
# clips task it counts that share of the silent seconds (it does not listen).
TOY_SFT_MIX = ["student"] * 4 + ["answer"] * 3 + ["solution", "hint", "rationale"]
CARELESS = {"toy": arithmetic.sloppy_solution, "shapes": shapes.careless_solution,
            "clips": clips.careless_solution}


def step_demonstrations(examples: list, step: int, *, data_spec: str, per_step: int,
                        seed: int, slip: float, rank: int, world: int):
    """(examples, prompt texts, targets) of one SFT step on this rank: the same data order as
    RL (a function of seed and step), so the warm start resumes exactly."""
    exs = data.step_examples(examples, step, prompts_per_step=per_step, seed=seed, rank=rank,
                             world=world)
    rng = random.Random(f"{seed}-{step}-{rank}")  # a string seed: stable across runs
    tpl, toy = templates(data_spec), data_spec in data.TASKS
    texts, targets = [], []
    for e in exs:
        kind = rng.choice(TOY_SFT_MIX) if toy else "student"
        kind = kind if kind == "student" or getattr(e, kind) else "student"  # e.g. no hint
        texts.append(render(tpl[kind], e))
        target = e.solution or e.answer  # the worked solution; a bare answer if there is none
        if data_spec == "chains":  # shown a reference, its demonstrator may cite it
            target = chains.demonstration(e, kind, rng, slip)
        elif toy and kind == "student":  # the demonstrator slips without a context
            target = CARELESS[data_spec](e, rng, slip)
        targets.append(target)
    return exs, texts, targets


def sft_step_on(model, opt, examples: list, step: int, tok, cfg, dist) -> dict:
    """One SFT step of a run (`cfg`: its --algo sft settings) on this step's demonstrations:
    what `python train.py --algo sft` and the toy warm start (warmstart.py) both run."""
    exs, texts, targets = step_demonstrations(
        examples, step, data_spec=cfg.data, per_step=cfg.prompts_per_step, seed=cfg.seed,
        slip=cfg.demo_slip, rank=dist.rank, world=dist.world)
    b = sft_batch(exs, texts, targets, tok, prompts=prompts_for(cfg), dist=dist)
    return sft_step(model, opt, b, rows=cfg.micro_batch_size, logit_chunk=cfg.logit_chunk,
                    max_grad_norm=cfg.max_grad_norm, dist=dist,
                    lr=lr_at(step, lr=cfg.lr, warmup=cfg.lr_warmup_steps,
                             schedule=cfg.lr_schedule, steps=cfg.steps))
