"""Every training option in one dataclass, each algorithm's paper defaults, and validation.

`python train.py --help` lists the fields of `Config` as flags. A run's options are resolved in
three layers: the paper's settings for the algorithm (`PAPER_DEFAULTS`); on the toy model,
the scale-dependent ones (learning rate, batch, lengths, steps) from `TOY_DEFAULTS`; then
whatever the command line gives, which always wins. Impossible combinations fail here,
before anything is loaded.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch

import data
from rollout import GENERATION_MODES

ALGOS = ("sft", "grpo", "dr_grpo", "dapo", "opd", "opsd", "sdpo", "srpo", "ptdpo", "rlsd")


@dataclass
class Config:
    algo: str = "rlsd"                # one of ALGOS
    model: str = "toy"                # 'toy' (warm-started, cached), a local HF directory or a hub id
    teacher: str = ""                 # OPD's external teacher: 'toy' or a directory / hub id
    data: str = "toy"                 # 'toy' or a .jsonl / .parquet file
    eval_data: str = "toy"            # 'toy' (test + ood splits) or a file; '' disables evaluation
    prompt_key: str = "prompt"        # dataset column names
    answer_key: str = "answer"
    solution_key: str = "solution"
    hint_key: str = "hint"
    rationale_key: str = "rationale"
    images_key: str = "images"
    steps: int = 50                   # optimizer steps (one per rollout batch)
    prompts_per_step: int = 32        # P prompts per step, over all ranks
    group_size: int = 8               # G rollouts per prompt
    micro_batch_size: int = 0         # rows per forward/backward; 0 = the whole local batch
    max_new_tokens: int = 4096        # response length limit
    temperature: float = 1.0          # rollout temperature; the losses use the same one
    ignore_eos: bool = False          # benchmarks: always generate max_new_tokens tokens
    generation: str = "dynamic"       # KV cache: dynamic | static | compiled (CUDA, one process)
    logit_chunk: int = 0              # positions per LM-head chunk: 0 auto (16M logits CPU, 128M GPU)
    lr: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    adv_scale: str = "group"          # 'group' (GRPO) or 'none' (Dr. GRPO)
    loss_agg: str = "token-mean"      # see grpo.aggregate
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0            # <= 0 disables
    kl_coef: float = 0.0              # k3 KL to the initial model
    teacher_mode: str = "none"        # none | live | frozen | sync | ema | trust | external
    teacher_sync: int = 10            # RLSD: re-sync the frozen teacher every N steps (paper 10, code 20)
    teacher_ema: float = 0.05         # SDPO/SRPO EMA rate (and trust-region mix)
    context: str = "answer"           # privileged context: answer | solution | hint | rationale | sibling | none
    lam0: float = 0.5                 # RLSD lambda
    lam_decay: int = 50               # RLSD lambda decay steps (paper 50, code 60)
    lam_warmup: int = 0
    eps_w: float = 0.2                # RLSD weight clip
    beta: float = 0.5                 # divergence teacher weight: 0 forward KL, 1 reverse KL
    top_k: int = 100                  # distillation top-k (0 = full vocabulary)
    token_clip: float = 0.0           # OPSD pointwise clip (0 = off)
    is_clip: float = 2.0              # SDPO importance-weight cap
    success_threshold: float = 0.5    # SDPO/SRPO: reward that counts as a success
    srpo_beta: float = 1.0            # SRPO entropy-weight temperature
    ptd_coef: float = 0.05            # PTD-PO lambda
    ptd_tau: float = 1.0              # PTD-PO group-accuracy threshold
    opd_coef: float = 1.0             # OPD KL-advantage coefficient
    dapo_max_gen_batches: int = 3     # DAPO dynamic sampling: extra generation rounds
    overlong_cache: int = 0           # DAPO overlong buffer L_cache (0 = off)
    max_prompt_tokens: int = 0        # longest student prompt allowed (0 = no limit)
    long_prompts: str = "fail"        # a prompt over the limit: 'fail' (name the row) or 'skip' (count)
    max_skips: int = 5                # stop after this many consecutive non-finite steps
    warm_start_steps: int = 1300      # toy: SFT steps of the cached warm start
    cache_dir: str = ""               # toy warm-start cache ('' = ~/.cache/rlsd-reference)
    seed: int = 0
    out: str = ""                     # run directory ('' = runs/<algo>)
    resume: bool = False              # continue from the newest complete checkpoint in --out
    eval_every: int = 0               # 0 = only before and after training
    eval_n: int = 200                 # toy evaluation problems per split
    save_every: int = 0               # 0 = only at the end
    keep_checkpoints: int = 3
    dtype: str = "float32"            # float32 | bfloat16
    malloc_threshold: int = 0         # CPU: glibc mmap threshold in bytes, 0 = glibc's default (README)
    log_every: int = 1


# Paper settings per algorithm (see the spec notes and each module's docstring).
PAPER_DEFAULTS = {
    "sft": dict(lr=1e-5, context="none"),
    # DeepSeekMath: std-normalised, per-sequence mean, k3 KL 0.04, symmetric clip
    "grpo": dict(loss_agg="seq-mean-token-mean", kl_coef=0.04, clip_high=0.2, context="none"),
    # Dr. GRPO: no std, token sum / constant, no KL
    "dr_grpo": dict(adv_scale="none", loss_agg="seq-mean-token-sum-norm", clip_high=0.2,
                    context="none"),
    # DAPO: clip-higher, token-mean, dynamic sampling, overlong shaping (4096 of 20480)
    "dapo": dict(max_new_tokens=20480, overlong_cache=4096, context="none"),
    # Thinking Machines OPD: external teacher, sampled-token reverse KL as the advantage
    "opd": dict(teacher_mode="external", group_size=4, context="none"),
    # OPSD v3: 1 rollout, T 1.1, forward KL, pointwise clip 0.05, frozen teacher, lr 5e-6
    "opsd": dict(group_size=1, temperature=1.1, beta=0.0, top_k=0, token_clip=0.05,
                 teacher_mode="frozen", context="solution", lr=5e-6, max_grad_norm=0.1,
                 max_new_tokens=1024, prompts_per_step=32, steps=100),
    # SDPO (no rich feedback): JSD 0.5, top-100 + tail, EMA 0.05, lr 1e-5, no std
    "sdpo": dict(beta=0.5, top_k=100, teacher_mode="ema", teacher_ema=0.05, context="sibling",
                 adv_scale="none", lr=1e-5, max_new_tokens=8192, prompts_per_step=32),
    # SRPO: Dr. GRPO advantages, SDPO branch as above, lr 5e-6
    "srpo": dict(beta=0.5, top_k=100, teacher_mode="ema", teacher_ema=0.05, context="sibling",
                 adv_scale="none", lr=5e-6, max_new_tokens=8192, prompts_per_step=32),
    # PTD-PO: frozen reference teacher with the hint, k3 KL 0.01, clip high 0.3
    "ptdpo": dict(teacher_mode="frozen", context="hint", kl_coef=0.01, clip_high=0.3,
                  top_k=100, beta=0.5, prompts_per_step=384),
    # RLSD: frozen teacher re-synced every 10 steps, lambda 0.5 -> 0 over 50 steps
    "rlsd": dict(teacher_mode="sync", context="answer", max_new_tokens=4096, prompts_per_step=256),
}
# The toy task is ~1e4 times smaller than the papers' settings: learning rate, batch and
# lengths are scaled to it; every algorithmic constant above is kept.
TOY_DEFAULTS = dict(prompts_per_step=16, max_new_tokens=40, lr=2e-4, steps=150,
                    eval_every=50, overlong_cache=0)
TOY_ALGO_DEFAULTS = {"sft": dict(lr=3e-3, prompts_per_step=64, steps=1300, eval_every=250),
                     "opsd": dict(prompts_per_step=32, max_grad_norm=1.0)}


def _cli_type(default):
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "y")
    return type(default)


def parse_config(argv=None) -> Config:
    """Flags are generated from Config's fields; unset flags take the algorithm's defaults."""
    p = argparse.ArgumentParser(description="Train with RLVR or on-policy self-distillation.")
    for f in dataclasses.fields(Config):
        kw = dict(choices=ALGOS) if f.name == "algo" else {}
        p.add_argument("--" + f.name.replace("_", "-"), type=_cli_type(f.default),
                       default=argparse.SUPPRESS, **kw)
    given = vars(p.parse_args(argv))
    return resolve_config(given)


def resolve_config(given: dict) -> Config:
    algo = given.get("algo", Config.algo)
    values = dict(PAPER_DEFAULTS[algo])
    if given.get("model", Config.model) == "toy":
        values.update(TOY_DEFAULTS, **TOY_ALGO_DEFAULTS.get(algo, {}))
    values.update(given)
    cfg = Config(**values)
    if not cfg.out:
        cfg.out = os.path.join("runs", cfg.algo)
    check_config(cfg)
    return cfg


def check_config(cfg: Config):
    """Impossible combinations fail before anything is loaded."""
    def bad(msg):
        raise SystemExit(f"config error: {msg}")
    if cfg.algo == "opd" and not cfg.teacher:
        bad("--algo opd needs --teacher (a model directory, hub id, or 'toy')")
    if cfg.algo in ("sdpo", "srpo", "grpo", "dr_grpo", "dapo", "rlsd", "ptdpo") and cfg.group_size < 2:
        bad(f"--algo {cfg.algo} compares rollouts within a group: --group-size must be >= 2")
    if cfg.teacher_mode not in ("none", "live", "frozen", "sync", "ema", "trust", "external"):
        bad(f"unknown --teacher-mode {cfg.teacher_mode!r}")
    if cfg.context not in ("none", "sibling") + data.CONTEXTS:
        bad(f"unknown --context {cfg.context!r}")
    if cfg.adv_scale not in ("group", "none"):
        bad("--adv-scale must be 'group' or 'none'")
    if cfg.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        bad(f"unknown --loss-agg {cfg.loss_agg!r}")
    if cfg.prompts_per_step < 1 or cfg.steps < 0 or cfg.max_new_tokens < 1:
        bad("--prompts-per-step and --max-new-tokens must be >= 1, --steps >= 0")
    if not 0.0 <= cfg.beta <= 1.0:
        bad("--beta must be in [0, 1]")
    if cfg.long_prompts not in ("fail", "skip"):
        bad("--long-prompts must be 'fail' or 'skip'")
    if cfg.generation not in GENERATION_MODES:
        bad(f"--generation must be one of {', '.join(GENERATION_MODES)}")
    if cfg.generation == "compiled" and not torch.cuda.is_available():
        bad("--generation compiled replays CUDA graphs and needs a GPU (use 'dynamic' on CPU)")
