"""Every training option in one dataclass, each algorithm's paper defaults, and validation.

`python train.py --help` lists the fields of `Config` as flags, grouped by the `# ---`
headers below, each with its trailing comment as help. A run's options are resolved in three
layers: the paper's settings for the algorithm (`PAPER_DEFAULTS`); on the toy model, the
scale-dependent ones (learning rate, batch, lengths, steps) from `TOY_DEFAULTS` (both in
defaults.py); then whatever the command line gives, which always wins. Impossible combinations, and flags the
chosen algorithm would ignore, fail here, before anything is loaded.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass


import data
from engine import presets
from engine.checks import check_config, model_path_problem  # noqa: F401 (config.model_path_problem)
from engine.lora import LORA_TARGETS
from engine.defaults import (PAPER_DEFAULTS, TOY_ALGO_DEFAULTS, TOY_CONTEXT,  # noqa: F401
                             TOY_DEFAULTS, USED_BY, NO_THINKING, THINKING)

ALGOS = ("sft", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "opd", "opsd", "sdpo", "srpo",
         "ptdpo", "csd", "rlsd")


@dataclass
class Config:
    # --- what to train, on what
    preset: str = ""                  # a paper's recipe from recipes/ (--list-presets); any flag overrides it
    algo: str = "rlsd"                # sft grpo dr_grpo dapo gspo rloo opd opsd sdpo srpo ptdpo csd rlsd
    model: str = "toy"                # 'toy' (warm-started, cached), a local HF directory or a hub id
    teacher: str = ""                 # OPD's external teacher: 'toy' (SFT from a careful demonstrator) or a directory / hub id; several: repeat the flag (NAME=PATH each), the data's teacher column picks each row's
    teacher_key: str = "teacher"      # data column naming each row's teacher (several --teacher; rows without one: the first)
    data: str = "toy"                 # an embedded task: 'toy' (arithmetic), 'chains' (arithmetic in words, where a reference can leak), 'shapes' (images; a tiny Qwen3-VL), 'clips' (video with sound; a tiny Qwen2.5-Omni thinker); or a .jsonl / .json / .csv / .parquet file
    eval_data: str = "auto"           # 'auto': an embedded --data task's test + ood splits, none for a file; an embedded task, a .jsonl / .json / .csv / .parquet file, or '' for none
    prompt_key: str = "prompt"        # data column with the question (the student's prompt)
    answer_key: str = "answer"        # data column with the final answer (the verifier's target)
    solution_key: str = "solution"    # data column with a reference solution (OPSD's teacher)
    hint_key: str = "hint"            # data column with an answer-free hint (PTD-PO's teacher)
    rationale_key: str = "rationale"  # data column with a rationale (OmniOPSD-style OPSD)
    rationales: str = ""              # with --data mer-unibench:DIR: a JSONL or CSV file of name + rationale, joined to the clips by name
    images_key: str = "images"        # data column with image paths, relative to the data file (vision-language models)
    videos_key: str = "videos"        # data column with video files (PyAV), frame-image lists or directories, relative to the data file
    audios_key: str = "audios"        # data column with audio files (WAV, .npy at 16 kHz, or what PyAV decodes), relative to the data file
    teacher_prompt_key: str = "teacher_prompt"  # data column with a row's whole teacher prompt (PTD-PO prompt_with_hint)
    reward: str = "verifier"          # verifier | dapo (+-1) | rlsd_format | math_verify | module:function (rewards.py)
    # --- prompts (prompts.py)
    student_template: str = ""        # the student's prompt over the row's fields, e.g. 'Problem: {prompt}' ('' = the task's)
    system_prompt: str = ""           # a system message before the student's and the teacher's prompt
    chat_template_kwargs: str = ""    # JSON options for the student's chat template, e.g. '{"enable_thinking": false}'
    teacher_chat_template_kwargs: str = ""  # the same for the teacher's prompt ('' = the student's)
    max_teacher_prompt_tokens: int = 0  # cut the teacher's privileged text to fit this many tokens (0 = no limit)
    # --- rollouts
    steps: int = 50                   # optimizer steps (one per rollout batch)
    prompts_per_step: int = 32        # P prompts per step, over all ranks
    group_size: int = 8               # G rollouts per prompt
    max_new_tokens: int = 4096        # response length limit
    temperature: float = 1.0          # rollout temperature; every loss uses the same one
    rollout_top_p: float = 1.0        # sample from the top-p nucleus (1 = all); losses keep the full softmax
    rollout_top_k: int = 0            # sample from the k likeliest tokens (0 = all); not --top-k
    ignore_eos: bool = False          # benchmarks: always generate max_new_tokens tokens
    generation: str = "dynamic"       # KV cache: dynamic | static | compiled (CUDA, one process)
    rollout_micro_batch: int = 0      # rows sampled together per process (0 = all): bounds the rollout's KV cache
    max_prompt_tokens: int = 0        # longest student prompt allowed (0 = no limit)
    long_prompts: str = "fail"        # a prompt over the limit: 'fail' (name the row) or 'skip' (count)
    # --- optimisation
    lr: float = 1e-6                  # AdamW learning rate (after warm-up)
    lr_warmup_steps: int = 0          # linear warm-up from 0 over this many optimizer steps
    lr_schedule: str = "constant"     # after warm-up: constant | linear | cosine (decay to 0 at --steps)
    weight_decay: float = 0.01        # AdamW weight decay
    max_grad_norm: float = 1.0        # clip the global gradient norm to this
    mini_batch_size: int = 0          # prompts per optimizer step, all ranks (verl ppo_mini_batch_size); 0 = the whole rollout batch
    ppo_epochs: int = 1               # passes over the rollout batch, each one step per mini-batch
    micro_batch_size: int = 0         # rows per forward/backward; 0 = the whole local batch
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (less memory, ~1/3 more compute)
    freeze_vision: bool = False       # a vision-language model: train the language model only, the vision tower (and its merger) stays as loaded
    freeze_towers: bool = False       # a multimodal model: the vision AND audio towers stay as loaded (--freeze-vision: the vision tower only)
    video_fps: float = 2.0            # video frames sampled per second (the checkpoint's own setting wins); frames given as images are taken at this rate
    use_audio_in_video: bool = False  # Qwen2.5-Omni: a video's own audio track too, interleaved with its frames in 2 s chunks
    logit_chunk: int = 0              # positions per LM-head chunk: 0 auto (16M logits CPU, 128M GPU), -1 all
    dtype: str = "float32"            # compute dtype: float32 | bfloat16 (master weights stay float32)
    # --- LoRA (lora.py; pip install -e '.[lora]')
    lora_rank: int = 0                # adapter rank r; 0 = full fine-tuning. Only the adapters are trained and saved
    lora_alpha: float = 0.0           # adapter scale alpha (the update is alpha / r * B A); 0 = 2 * rank
    lora_dropout: float = 0.0         # dropout on the adapters' input
    lora_targets: str = LORA_TARGETS  # comma-separated linear layers to adapt
    # --- the policy-gradient loss (GRPO family; RLSD, OPD, SRPO and PTD-PO use it too)
    adv_scale: str = "group"          # advantages: 'group' (r - mean) / std (GRPO), 'none' r - mean (Dr. GRPO), 'loo' leave-one-out (RLOO)
    loss_agg: str = "token-mean"      # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (grpo.aggregate)
    clip_low: float = 0.2             # PPO ratio clip below 1 (inert on-policy: one step per batch)
    clip_high: float = 0.28           # PPO ratio clip above 1, DAPO's clip-higher (inert on-policy)
    dual_clip: float = 3.0            # dual-clip cap for A < 0, <= 0 disables (inert on-policy)
    kl_coef: float = 0.0              # k3 KL to the initial model, added per token
    kl_direction: str = "reverse"     # the k3 KL's direction: reverse KL(policy || reference), or forward (PTD-PO's released forward_kl: the log-probs swapped)
    overlong_cache: int = 0           # DAPO overlong buffer L_cache in tokens (0 = off)
    dapo_max_gen_batches: int = 3     # DAPO dynamic sampling: generation rounds per step
    # --- teachers
    teacher_mode: str = "none"        # none | live | frozen | sync | ema | trust | external
    context: str = "answer"           # what the teacher sees: answer | solution | hint | rationale | sibling | none
    context_source: str = "own"       # own | other: the privileged text of a different, randomly chosen training problem (a control: does the RIGHT context matter?)
    teacher_sync: int = 10            # RLSD: re-sync the frozen teacher every N steps (paper 10, code 20)
    teacher_ema: float = 0.05         # SDPO/SRPO/CSD EMA rate (and the trust-region mix)
    eos_ids: str = ""                 # equivalent end-of-sequence ids, comma-separated, summed into one stopping action in every divergence and ratio ('' = every end id the tokenizer and generation config declare)
    rollout_refresh: int = 1          # OPD/OPSD: sample with the student of every K-th step (1: on-policy; 0: the initial student's rollouts, cached for the whole run: Semi-OPD)
    # --- RLSD
    lam0: float = 0.5                 # RLSD lambda at step 0: the weight of the teacher's evidence
    lam_decay: int = 50               # RLSD lambda decays linearly to 0 over this many steps (paper 50, code 60)
    lam_warmup: int = 0               # RLSD lambda warm-up steps (code default 0)
    eps_w: float = 0.2                # RLSD evidence-weight clip: w in [1 - eps_w, 1 + eps_w]
    # --- distillation (OPD, OPSD, SDPO, SRPO, PTD-PO)
    beta: float = 0.5                 # divergence teacher weight: 0 forward KL, 1 reverse KL, else JSD
    top_k: int = 100                  # distillation top-k support (0 = full vocabulary)
    distill_agg: str = "token-mean"   # distillation mean: token-mean | seq-mean | seq-mean-all-rows | micro-batch-mean (losses.py)
    token_clip: float = 0.0           # OPSD pointwise clip per vocabulary entry (0 = off)
    is_clip: float = 2.0              # SDPO importance-weight cap (inert on-policy)
    success_threshold: float = 0.5    # SDPO/SRPO/CSD: the reward that counts as a success
    csd_balance: str = "0.5,0.5"      # CSD: weights of attraction to the correct sibling's teacher and repulsion from the wrong one's
    srpo_beta: float = 1.0            # SRPO entropy-weight temperature: w ~ exp(-beta H_teacher)
    ptd_coef: float = 0.05            # PTD-PO lambda: weight of the PTD term
    ptd_tau: float = 1.0              # PTD-PO: groups with accuracy below tau are distilled
    ptd_divergence: str = "jsd"       # PTD-PO term: jsd (released; its gradient is exactly 0) | jsd-exact | forward KL(T||S) | reverse KL(S||T)
    opd_coef: float = 1.0             # OPD: coefficient of the reverse-KL advantage
    # --- run, checkpoints, logging
    seed: int = 0                     # data order, sampling and initialisation
    out: str = ""                     # run directory ('' = runs/<algo>)
    resume: bool = False              # continue from the newest complete checkpoint in --out
    overwrite: bool = False           # start afresh in a non-empty --out, deleting its run files
    save_on_signal: bool = False      # on SIGTERM / Ctrl-C, checkpoint the finished step before exiting
    save_every: int = 0               # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 3         # newest checkpoints kept on disk
    eval_every: int = 0               # evaluate every N steps (0 = only before and after)
    eval_at: str = ""                 # also evaluate after these steps, comma-separated (e.g. 10,20,30,40: a denser start)
    eval_n: int = 500                 # toy evaluation problems per split
    log_every: int = 1                # console line every N steps (metrics.jsonl gets every step)
    report_to: str = ""               # also send the metrics to: tensorboard, wandb, trackio (comma-separated; trackers.py)
    max_skips: int = 5                # stop after this many consecutive non-finite steps
    warm_start_steps: int = 2400      # toy: SFT steps of the cached warm start
    warm_start: str = ""              # toy: start from this warm-start directory (a study archive) instead of the shipped or cached one
    rebuild_warm_start: bool = False  # toy: train the warm start here (SFT, minutes; then cached) even where one ships with the project
    demo_slip: float = 0.8            # toy SFT: the demonstrator drops a carry (shapes: overlooks a shape; clips: counts a silent second) with this probability; OPD's toy teacher learns from a careful one (0)
    cache_dir: str = ""               # toy warm-start cache ('' = ~/.cache/rlsd-reference)
    dry_run: bool = False             # build the model on the meta device, print its size and memory per GPU, check --data, exit
    gpus: int = 0                     # --dry-run: GPUs to estimate for (0 = the preset's, else this run's processes)


def field_help() -> dict:
    """{field: (group header, help text)} from the comments in Config's source."""
    out, group = {}, ""
    for line in inspect.getsource(Config).splitlines():
        header = re.match(r"\s+# --- (.*)", line)
        if header:
            group = header.group(1)
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = (group, m.group(2))
    return out


def _bool(s: str) -> bool:
    """A boolean flag's value: only the words below, so `--resume ture` is an error, not False."""
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage block; exit 2
        print(f"config error: {message} (python train.py --help lists every flag)",
              file=sys.stderr)
        raise SystemExit(2)


def parse_config(argv=None) -> Config:
    """Flags are generated from Config's fields; unset flags take the algorithm's defaults."""
    p = _Parser(description="Train with RLVR or on-policy self-distillation. Each option's "
                "default is the value that applies when you leave it out: with no flags, RLSD on "
                "the embedded toy task; each algorithm's paper settings on a model directory "
                "(docs/paper-defaults.md).")
    docs, groups = field_help(), {}
    for f in dataclasses.fields(Config):
        group, text = docs[f.name]
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # `--resume`, `--resume true|false`, `--no-resume`
            g.add_argument(flag, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                           metavar="BOOL", help=f"{text} {default_help(f.name)}")
            g.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        kw = dict(choices=ALGOS) if f.name == "algo" else {}
        if f.name == "teacher":  # given more than once: several teachers (comma-joined)
            kw = dict(action="append")
        g.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS,
                       help=f"{text} {default_help(f.name)}", **kw)
    p.add_argument("--list-presets", action="store_true", default=argparse.SUPPRESS,
                   help="print the recipes in recipes/ (model, data, GPUs) and exit")
    given = vars(p.parse_args(argv))
    if "teacher" in given:  # several --teacher: kept comma-joined in the one field
        if any("," in t for t in given["teacher"]):
            p.error(f"--teacher {next(t for t in given['teacher'] if ',' in t)!r}: a comma "
                    f"in a teacher's path or name is not supported")
        given["teacher"] = ",".join(given["teacher"])
    if given.pop("list_presets", False):
        print(presets.listing(DEFAULTS))
        raise SystemExit(0)
    notes = []
    cfg = resolve_config(given, notes)
    if os.environ.get("RANK", "0") == "0":
        for line in notes:
            print(f"adapted: {line}", flush=True)
    return cfg


DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def layered_defaults(algo: str, model: str, data_spec: str, preset: dict | None = None) -> dict:
    """The values an option takes when the command line leaves it out, layer over layer: the
    algorithm's paper defaults, the toy's scale (on the toy model), the --preset recipe, then
    what the embedded task needs (`--help` prints them: `default_help`)."""
    values = dict(PAPER_DEFAULTS[algo])
    if model == "toy":
        values.update(TOY_DEFAULTS, **TOY_ALGO_DEFAULTS.get(algo, {}))
    values.update(preset or {})
    if data_spec == "shapes" and model == "toy":  # its answers are at most 11 characters
        values["max_new_tokens"] = 16
        if algo == "sft":  # measured: at 3e-3 the tiny Qwen3-VL stays at the prior longer
            values["lr"] = 1e-3
        # its tower was taught to see before the warm start (shapes.teach_to_see), and
        # unfrozen a single update broke it (engine/toy/warmstart.py)
        values["freeze_vision"] = True
    if data_spec == "chains" and model == "toy":  # worded: up to ~50 characters
        values["max_new_tokens"] = 64  # (4 operations, the OOD split: ~65)
    if data_spec == "clips" and model == "toy":  # answers of at most 6 characters
        values["max_new_tokens"] = 12
        if algo == "sft":
            values["lr"] = 1e-3  # as the shapes task's tiny VLM
        # the towers were taught to see and hear before the warm start (clips.teach_towers),
        # and the language model learns over them, as on the shapes task
        values["freeze_towers"] = True
        # measured (`--algo sft --data clips --steps 400 --eval-every 100`): the answer-shown
        # teacher at 93-96% of the test split from step 300, the student at 40-53%
        values["warm_start_steps"] = 1000
    if "toy" in (data_spec, model) or data_spec in data.TASKS:
        # the toy task's own prompts, and the toy model's 256-token context: the compact
        # template, and the plain verifier (no <answer> tags to score)
        values["student_template"] = ""
        if values.get("reward") == "rlsd_format":
            values["reward"] = "verifier"
    return values


def resolve_config(given: dict, notes: list | None = None, *, paths: bool = True) -> Config:
    """The layers, each overriding the one before (`layered_defaults`), then the command line.
    Defaults that no longer fit the sizes given are adapted (`fit_sizes`), each with a line in
    `notes`."""
    preset = presets.load(given["preset"], DEFAULTS)[1] if given.get("preset") else {}
    chosen = {**preset, **given}
    algo, model = chosen.get("algo", Config.algo), chosen.get("model", Config.model)
    if algo not in ALGOS:  # a recipe's algo (the command line's is checked by argparse)
        raise SystemExit(f"config error: recipe {given.get('preset')}: algo {algo!r} is not "
                         f"one of {', '.join(ALGOS)}")
    values = layered_defaults(algo, model, chosen.get("data", Config.data), preset)
    defaults = dict(values)  # what the user did not type: paper, toy scale, preset
    values.update(given)
    cfg = Config(**values)
    if cfg.eval_data == "auto":  # an embedded task's own splits; a user's file: only if asked
        cfg.eval_data = cfg.data if cfg.data in data.TASKS else ""
    if not cfg.out:
        cfg.out = os.path.join("runs", cfg.algo)
    adapted = fit_sizes(cfg, given, {**DEFAULTS, **defaults},
                        world=int(os.environ.get("WORLD_SIZE", "1")))
    if notes is not None:
        notes.extend(adapted)
    check_config(cfg, chosen, paths=paths, typed=given)
    return cfg


def default_help(name: str) -> str:
    """What --help says of an option's default: the value that applies when it is left out
    (`python train.py` runs --algo rlsd on the toy model and task), then every other value a
    layer gives it: each algorithm's paper default on a real model, the toy's, each task's."""
    def show(v):
        return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)
    base = DEFAULTS[name]
    runs = layered_defaults(Config.algo, "toy", Config.data).get(name, base)
    parts, real, toy = [], {}, {}
    for algo in ALGOS:
        v = PAPER_DEFAULTS[algo].get(name, base)
        if v != base:
            real.setdefault(show(v), []).append(algo)
        for spec in data.TASKS:
            t = layered_defaults(algo, "toy", spec).get(name, base)
            if t != runs:
                toy.setdefault(show(t), []).append(algo if spec == "toy" else f"{algo}/{spec}")
    if real:
        parts.append("paper default on a model directory: " + "; ".join(
            f"{v} ({', '.join(a)})" for v, a in real.items()) + f"; else {show(base)}")
    if toy and len(toy) <= 4:
        parts.append("on the toy model: " + "; ".join(f"{v} for {', '.join(a[:6])}"
                                                      + (", ..." if len(a) > 6 else "")
                                                      for v, a in toy.items()))
    elif toy:
        parts.append("on the toy model other values per algorithm and task (docs/paper-defaults.md)")
    return f"(default: {show(runs)}" + "".join(f"; {p}" for p in parts) + ")"


def _nearest_divisor(n: int, target: float, ok) -> int:
    """The divisor d of n with ok(d) nearest to target (the smaller one on a tie)."""
    return min((d for d in range(1, n + 1) if n % d == 0 and ok(d)),
               key=lambda d: (abs(d - target), d))


def fit_sizes(cfg: Config, given: dict, defaults: dict, world: int = 1) -> list[str]:
    """Paper defaults that depend on a size give way to the sizes the user set: a value the
    user did not type (the algorithm's default or a preset's) is changed to fit, with one line
    saying what and why; a value the user typed is left for check_config to refuse.
      prompts per step   a multiple of the number of processes (each takes whole groups)
      mini-batch size    the paper's number of updates per rollout batch (DAPO: 512 prompts
                         in 16), or the nearest that whole mini-batches of prompts allow
      overlong buffer    DAPO's 4096 of 20480 tokens: the same share of --max-new-tokens
      response length    below the model's context (its config.json), so prompts fit
      lr warm-up         shorter than the run
    `defaults`: every value before the command line. Returns the lines (parse_config prints
    them)."""
    notes = []
    paper = {**DEFAULTS, **PAPER_DEFAULTS.get(cfg.algo, {})}  # the paper's own sizes
    if world > 1 and cfg.prompts_per_step % world and "prompts_per_step" not in given:
        fit = max(world, round(cfg.prompts_per_step / world) * world)
        notes.append(f"--prompts-per-step {fit} (the default {cfg.prompts_per_step} split over "
                     f"{world} processes, each taking whole prompts)")
        cfg.prompts_per_step = fit
    if cfg.mini_batch_size and "mini_batch_size" not in given and cfg.algo != "sft":
        P, mini = cfg.prompts_per_step, cfg.mini_batch_size
        updates = defaults["prompts_per_step"] / defaults["mini_batch_size"]
        k = _nearest_divisor(P, updates, lambda d: (P // d) % world == 0)
        if P // k != mini:
            notes.append(f"--mini-batch-size {P // k} ({k} update{'s' * (k > 1)} per rollout "
                         f"batch of {P} prompts" + (f" over {world} processes" if world > 1 else "")
                         + f", as near as they allow to the default {updates:g} of "
                         f"{defaults['prompts_per_step']} prompts in mini-batches of {mini})")
            cfg.mini_batch_size = P // k
    context = _context_length(cfg.model)
    if (context and cfg.max_new_tokens >= context and "max_new_tokens" not in given
            and cfg.algo != "sft"):  # SFT generates nothing
        fit = context // 2
        notes.append(f"--max-new-tokens {fit} (the default {cfg.max_new_tokens} does not fit "
                     f"{cfg.model}'s {context}-token context with a prompt; half of it)")
        cfg.max_new_tokens = fit
    if (cfg.overlong_cache and "overlong_cache" not in given
            and paper["overlong_cache"] and cfg.max_new_tokens != paper["max_new_tokens"]):
        fit = round(paper["overlong_cache"] * cfg.max_new_tokens / paper["max_new_tokens"])
        if fit != cfg.overlong_cache:
            notes.append(f"--overlong-cache {fit} (DAPO's buffer is {paper['overlong_cache']} "
                         f"of {paper['max_new_tokens']} tokens: the same share of "
                         f"--max-new-tokens {cfg.max_new_tokens})")
            cfg.overlong_cache = fit
    if (cfg.lr_warmup_steps and cfg.steps and cfg.lr_warmup_steps >= cfg.steps
            and "lr_warmup_steps" not in given):
        fit = cfg.steps // 10
        notes.append(f"--lr-warmup-steps {fit} (the default {cfg.lr_warmup_steps} is not "
                     f"shorter than --steps {cfg.steps}: a tenth of the run)")
        cfg.lr_warmup_steps = fit
    return notes


def _context_length(model: str) -> int:
    """max_position_embeddings from a local model directory's config.json (the language
    model's, for a vision-language one), or 0 when it is not at hand (toy, hub id)."""
    if model == "toy-init":  # the toy Qwen3 built with random weights (models.build_toy_model)
        return TOY_CONTEXT
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return 0
    try:
        with open(path) as f:
            c = json.load(f)
    except (OSError, ValueError):
        return 0  # check_paths and the loader report a bad model directory
    c = c.get("text_config") or c.get("thinker_config", {}).get("text_config") or c
    return int(c.get("max_position_embeddings") or 0)
