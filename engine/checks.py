"""What a run's options may not be: every refusal before anything is loaded, one message each.

    check_config        all of the checks below, in order (config.resolve_config calls it)
    check_flags_used    a flag given to an algorithm that ignores it (defaults.USED_BY)
    check_teacher       the teacher, its mode and what it is shown
    check_sizes         batch sizes that the processes, groups and mini-batches must divide
    check_values        every number in its range and finite; every choice one of its names
    check_templates     a student template that parses and shows no privileged field
    check_paths         --model, --teacher, --data, --eval-data and --out name usable things
    model_path_problem  why a string cannot be a model directory or hub id

Each raises SystemExit("config error: ...") naming the flag; nothing here loads a model or
runs code named by a file.
"""
import math
import os
import string

import torch

import data
import distill
from engine import losses, prompts, rewards, trackers
from engine.defaults import USED_BY
from engine.rollout import GENERATION_MODES
from engine.teachers import TEACHER_MODES, teacher_specs

# field: (lowest allowed, highest allowed, strictly above the lowest?); every float option
# not listed must simply be finite
RANGES = {
    "steps": (0, None, False), "prompts_per_step": (1, None, False),
    "group_size": (1, None, False), "max_new_tokens": (1, None, False),
    "temperature": (0.0, None, True), "max_prompt_tokens": (0, None, False),
    "rollout_top_p": (0.0, 1.0, True), "rollout_top_k": (0, None, False),
    "lr": (0.0, None, True), "lr_warmup_steps": (0, None, False),
    "weight_decay": (0.0, None, False), "max_grad_norm": (0.0, None, True),
    "micro_batch_size": (0, None, False), "mini_batch_size": (0, None, False),
    "ppo_epochs": (1, None, False), "clip_low": (0.0, 1.0, False),
    "clip_high": (0.0, None, False), "kl_coef": (0.0, None, False),
    "overlong_cache": (0, None, False), "dapo_max_gen_batches": (1, None, False),
    "teacher_sync": (0, None, False), "teacher_ema": (0.0, 1.0, False),
    "lam0": (0.0, 1.0, False), "lam_decay": (0, None, False), "lam_warmup": (0, None, False),
    "eps_w": (0.0, 1.0, False), "top_k": (0, None, False), "token_clip": (0.0, None, False),
    "is_clip": (0.0, None, True), "srpo_beta": (0.0, None, False), "beta": (0.0, 1.0, False),
    "ptd_coef": (0.0, None, False), "ptd_tau": (0.0, 1.0, False), "opd_coef": (0.0, None, False),
    "success_threshold": (None, 1.0, False),  # a reward of at least this is a success
    "save_every": (0, None, False), "keep_checkpoints": (1, None, False),
    "eval_every": (0, None, False), "eval_n": (1, None, False), "log_every": (1, None, False),
    "max_skips": (1, None, False), "warm_start_steps": (1, None, False),
    "demo_slip": (0.0, 1.0, False), "video_fps": (0.0, None, True),
    "max_teacher_prompt_tokens": (0, None, False), "lora_rank": (0, None, False),
    "rollout_micro_batch": (0, None, False), "lora_alpha": (0.0, None, False),
    "rollout_refresh": (0, None, False),
    "lora_dropout": (0.0, 1.0, False), "gpus": (0, None, False),
    # the sampling streams are seeded with seed * 1_000_003 + rank, which must fit 64 bits
    "seed": (0, 2**63 // 1_000_003 - 1024, False),
}
# option: its allowed values
CHOICES = {
    "adv_scale": ("group", "none", "loo"),
    "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "distill_agg": losses.DISTILL_AGG, "ptd_divergence": distill.PTD_DIVERGENCES,
    "lr_schedule": ("constant", "linear", "cosine"), "dtype": ("float32", "bfloat16"),
    "long_prompts": ("fail", "skip"), "generation": GENERATION_MODES,
    "teacher_mode": TEACHER_MODES, "context_source": ("own", "other"),
    "context": ("none", "sibling") + data.CONTEXTS, "kl_direction": ("reverse", "forward"),
}
GROUP_ALGOS = ("sdpo", "srpo", "csd", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "rlsd",
               "ptdpo")


def bad(msg: str):
    raise SystemExit(f"config error: {msg}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg, given: dict = (), *, paths: bool = True, typed: dict = ()):
    """Every check, before anything is loaded. `given`: the options the user set (the command
    line and a recipe); `typed`: those typed on the command line (a custom reward function runs
    only when typed there: a recipe is data); `paths`: check the files named (not for the warm
    start's internal settings, which read and write only the cache)."""
    check_flags_used(cfg, given)
    check_teacher(cfg)
    check_sizes(cfg)
    check_values(cfg)
    check_templates(cfg)
    if cfg.preset and not cfg.dry_run and cfg.model != "toy" and cfg.data in data.TASKS:
        bad(f"--preset {cfg.preset} trains {cfg.model} on its dataset: give --data FILE "
            f"(recipes/README.md), or --model toy to try the recipe here")
    if paths and not cfg.dry_run:
        check_paths(cfg)
    try:
        trackers.names(cfg.report_to)
    except ValueError as e:
        bad(str(e))
    if cfg.reward not in rewards.REWARDS and "reward" not in typed:
        bad(f"reward {cfg.reward!r} comes from a recipe, not the command line; a recipe may name "
            f"only the built-in rewards ({', '.join(rewards.REWARDS)}): a module:function runs "
            f"code, so it must be typed as --reward")
    rewards.load_reward(cfg.reward)  # a bad name or module:function path fails now
    prompts.prompts_for(cfg)  # chat-template options that are not JSON objects fail now


def check_flags_used(cfg, given):
    """A flag the algorithm would ignore is an error, not a silent no-op."""
    for name in given:
        if name in USED_BY and cfg.algo not in USED_BY[name]:
            bad(f"{flag(name)} has no effect with --algo {cfg.algo} "
                f"(used by {', '.join(USED_BY[name])})")
    for name in ("lora_alpha", "lora_dropout", "lora_targets"):
        if name in given and not cfg.lora_rank:
            bad(f"{flag(name)} shapes LoRA adapters, and there are none without --lora-rank")


def check_teacher(cfg):
    """The teacher: who it is, what it is shown, and the toy model's special cases."""
    if cfg.warm_start and (cfg.model != "toy" or cfg.algo == "sft"):
        bad("--warm-start replaces the toy model's cached warm start: it needs --model toy "
            "(and an RL algorithm; --algo sft builds a warm start)")
    if cfg.warm_start and model_path_problem(cfg.warm_start):
        bad(f"--warm-start {cfg.warm_start}: {model_path_problem(cfg.warm_start)}")
    if (cfg.freeze_vision or cfg.freeze_towers) and cfg.model in ("toy", "toy-init") \
            and cfg.data not in data.MULTIMODAL_TASKS:
        bad("--freeze-vision freezes a vision-language model's tower; the toy model of "
            f"--data {cfg.data} is a text model")
    if cfg.teacher_mode == "external" and not cfg.teacher:
        bad(f"--algo {cfg.algo} with an external teacher needs --teacher (a model directory, "
            f"hub id, or 'toy'); --teacher-mode frozen makes the student its own teacher")
    if cfg.teacher and cfg.teacher_mode != "external":
        bad(f"--teacher is the external teacher; --teacher-mode {cfg.teacher_mode} scores with "
            f"the student's own weights (use --teacher-mode external)")
    if cfg.teacher_mode == "trust" and cfg.algo in losses.SAMPLED_TOKEN_TEACHER:
        bad(f"--teacher-mode trust mixes two models' logits (SDPO's trust region), which only "
            f"the whole-distribution losses read; --algo {cfg.algo} reads the teacher's "
            f"sampled-token log-probs: use sync, frozen, ema or live")
    if cfg.rationales and not cfg.data.startswith("mer-unibench:"):
        bad("--rationales joins rationales to clips by name: it needs --data mer-unibench:DIR "
            "(a data file carries its own rationale column)")
    if cfg.context_source == "other" and cfg.context not in data.CONTEXTS:
        bad(f"--context-source other swaps a row's {'/'.join(data.CONTEXTS)} for another "
            f"problem's; --context {cfg.context} has none to swap")


def check_sizes(cfg):
    """Groups of at least two where rollouts are compared; whole prompts per process and per
    mini-batch."""
    if cfg.algo in GROUP_ALGOS and cfg.group_size < 2:
        bad(f"--algo {cfg.algo} compares rollouts within a group: --group-size must be >= 2")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # every process runs the same passes
    for name in ("prompts_per_step", "mini_batch_size"):
        if getattr(cfg, name) % world:
            bad(f"{flag(name)} {getattr(cfg, name)} is not divisible by the {world} processes")
    if cfg.mini_batch_size and cfg.prompts_per_step % cfg.mini_batch_size:
        bad(f"--mini-batch-size {cfg.mini_batch_size} must divide --prompts-per-step "
            f"{cfg.prompts_per_step} (whole mini-batches of prompts per optimizer step)")


def check_values(cfg):
    """Every number in its range (RANGES) and finite, every choice one of its names
    (CHOICES), the evaluation steps, and a GPU for CUDA graphs."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            bad(f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            bad(f"{flag(name)} must be a finite number, got {value}")
    for name, (lo, hi, strict) in RANGES.items():
        v = getattr(cfg, name)
        low = lo is not None and (v <= lo if strict else v < lo)
        if low or (hi is not None and v > hi):
            span = " and ".join(([f"> {lo}" if strict else f">= {lo}"] if lo is not None else [])
                                + ([f"<= {hi}"] if hi is not None else []))
            hint = (" (greedy rollouts would make every rollout of a group the same, and the "
                    "losses score the samples at this temperature)") if name == "temperature" else ""
            bad(f"{flag(name)} must be {span}, got {v}{hint}")
    try:
        steps = [int(s) for s in cfg.eval_at.split(",") if s.strip()]
    except ValueError:
        steps = [0]
    if any(s < 1 for s in steps):
        bad(f"--eval-at must be steps (positive integers) separated by commas, got "
            f"{cfg.eval_at!r}")
    try:
        balance = [float(x) for x in cfg.csd_balance.split(",")]
    except ValueError:
        balance = []
    if len(balance) != 2 or not all(math.isfinite(x) and x >= 0 for x in balance):
        bad(f"--csd-balance must be two weights >= 0, attraction,repulsion (e.g. 0.5,0.5), got "
            f"{cfg.csd_balance!r}")
    try:
        [int(x) for x in cfg.eos_ids.split(",") if x.strip()]
    except ValueError:
        bad(f"--eos-ids must be token ids separated by commas, got {cfg.eos_ids!r}")
    if cfg.generation == "compiled" and not torch.cuda.is_available():
        bad("--generation compiled replays CUDA graphs and needs a GPU (use 'dynamic' on CPU)")


def template_fields(template: str) -> set:
    """The row fields a format string reads, whatever their conversion or format spec
    ({answer!r}, {answer:>5}, {answer.x} all read `answer`)."""
    fields = set()
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            fields.add(name.split(".")[0].split("[")[0])
            fields |= template_fields(spec or "")  # a nested field in a format spec
    return fields


def check_templates(cfg):
    """A student template is a format string over the row's fields that shows {prompt} and
    none of the privileged ones (the teacher's only)."""
    t = cfg.student_template
    if not t:
        return
    def malformed(e):
        bad(f"--student-template {t!r}: not a template over the fields prompt, answer, "
            f"solution, hint, rationale ({e!r}; write a literal brace as {{{{ }}}})")
    try:
        fields = template_fields(t)
    except ValueError as e:
        malformed(e)
    leaks = sorted(fields & set(data.CONTEXTS))
    if leaks:  # the student must never see a privileged context, however it is formatted
        bad(f"--student-template shows the student {{{leaks[0]}}}, a teacher-only field")
    try:
        t.format(prompt="", answer="", solution="", hint="", rationale="")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        malformed(e)
    if "prompt" not in fields:
        bad("--student-template must contain {prompt}")


def model_path_problem(value: str) -> str | None:
    """Why `value` cannot be a model (a directory with config.json, or a hub id), or None."""
    if os.path.exists(value):
        if not os.path.isdir(value):
            return "is a file; expected a model directory (config.json, weights, tokenizer) or a hub id"
        if not os.path.exists(os.path.join(value, "config.json")):
            return "directory has no config.json (not a Hugging Face model)"
        try:
            import json
            with open(os.path.join(value, "config.json")) as f:
                kind = str(json.load(f).get("model_type", ""))
        except (OSError, ValueError, AttributeError):
            return None  # transformers' loader says what is wrong with it
        if kind.startswith("qwen3_omni"):  # engine/vision.py: Qwen2.5-Omni's thinker only
            return ("is a Qwen3-Omni (mixture-of-experts) checkpoint, whose thinker takes other "
                    "inputs and positions; Qwen2.5-Omni's thinker is supported")
        return None
    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        return "no such directory (and not a hub id of the form org/name)"
    return None


def check_paths(cfg):
    """--model, --teacher, --data, --eval-data and --out name things that can be used."""
    models = [("--model", cfg.model)] + [(f"--teacher {n}" if n != p else "--teacher", p)
                                         for n, p in teacher_specs(cfg.teacher)]
    for name, value in models:
        problem = model_path_problem(value) if value not in ("", "toy", "toy-init") else None
        if problem:
            bad(f"{name} {value}: {problem}")
    names = [n for n, _ in teacher_specs(cfg.teacher)]
    if len(set(names)) < len(names):
        bad(f"--teacher names must differ, got {', '.join(names)}")
    for name, value in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if value.startswith("mer-unibench:"):  # a dataset directory (engine/mer.py)
            root = value[len("mer-unibench:"):]
            if not os.path.isdir(root) and not os.path.isdir(root.rsplit(":", 1)[0]):
                bad(f"{name} {value}: no such directory")
            continue
        if value not in ("", *data.TASKS) and not os.path.exists(value):
            bad(f"{name} {value}: no such file")
        if value not in ("", *data.TASKS) and os.path.isdir(value):
            bad(f"{name} {value}: is a directory; expected a data file")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        bad(f"--out {cfg.out}: is a file; expected a run directory")
    parent = cfg.out
    while parent and not os.path.exists(parent):  # the nearest existing ancestor
        parent = os.path.dirname(parent)
    if not os.access(parent or ".", os.W_OK | os.X_OK):
        bad(f"--out {cfg.out}: {os.path.abspath(parent or '.')} is not writable")
