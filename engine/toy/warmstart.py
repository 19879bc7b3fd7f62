"""The student's starting point: a local model, or the embedded toy model warm-started by SFT.

    load_policy     (model, tokenizer): 'toy' (the cached warm start, or --warm-start DIR),
                    'toy-init' (random weights), or a Hugging Face directory / hub id
    toy_checkpoint  the warm start, trained once and cached under a file lock, keyed by a
                    hash of its settings and of the code that builds it
    build_warm_start  the supervised fine-tuning that makes it: the steps of `--algo sft`
                    (engine/sft.py, on the task's demonstrations: demos.py) in one process
    overview        what `python train.py` is about to do, and for how long
"""
import dataclasses
import hashlib
import json
import os
import time

import torch

import data
from engine import checkpoint as ckpt, media, vision
from engine.losses import backward_chunked
from engine.sft import sft_batch, sft_step
from engine.update import clip_and_step, lr_at
from engine.config import Config, resolve_config
from engine.distributed import Dist
from engine.prompts import TOY_TEMPLATES, render
from engine.rollout import load_model
from engine.rundir import file_lock, log_line, writing
from engine.toy import arithmetic, chains, clips, demos, models, shapes, tasks

TOY_VERSION = "v3"  # part of the warm-start cache key (with the settings and the code)
# the code that makes the warm start's weights: its source is part of the cache key (the
# functions as imported here, so that a test wrapping one at run time changes no key)
_BUILDS_IT = (arithmetic.toy_example, arithmetic.toy_chain, arithmetic.sloppy_solution,
              arithmetic.make_toy, data.step_examples, models.build_toy_model,
              models.build_toy_tokenizer, demos.step_demonstrations, demos.sft_step_on, sft_batch,
              render, sft_step, backward_chunked, lr_at, clip_and_step)


def cache_dir(cfg: Config) -> str:
    return cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "rlsd-reference")


def warm_start_key(sft_cfg: Config) -> str:
    """A short hash of everything that makes the warm-start weights: the SFT settings, the
    source of the code that builds the task, the model and the SFT step, and the library
    versions. Any change gives a new cache entry, so a stale warm start is never reused."""
    import inspect
    import transformers
    settings = {k: v for k, v in dataclasses.asdict(sft_cfg).items()  # those that change weights
                if k not in ("out", "cache_dir", "eval_n", "eval_data", "eval_every", "log_every",
                             "overwrite", "save_every", "keep_checkpoints", "dry_run",
                             "gpus", "preset", "warm_start", "rebuild_warm_start")}
    parts = [TOY_VERSION, json.dumps(settings, sort_keys=True),
             torch.__version__, transformers.__version__, arithmetic.TOY_CHARS, repr(TOY_TEMPLATES),
             repr(demos.TOY_SFT_MIX), repr(arithmetic.MAX_OPERAND)]
    if sft_cfg.data == "shapes":  # the image task: its pictures and the tiny Qwen3-VL
        parts += [inspect.getsource(shapes), inspect.getsource(models.toy_vlm), repr(TOY_VLM),
                  inspect.getsource(vision.freeze_vision_tower)]
    if sft_cfg.data == "chains":  # the worded task: its responses and its demonstrator
        parts += [inspect.getsource(chains)]
    if sft_cfg.data == "clips":  # the omni task: its clips, the tiny thinker, the media path
        parts += [inspect.getsource(m) for m in (clips, media, vision)] + [
            inspect.getsource(models.toy_omni), repr(TOY_OMNI)]
    parts += [inspect.getsource(f) for f in _BUILDS_IT]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


# the settings that make a warm start's weights (with the task's own definition, below); the
# code that runs them is checked by tests/test_identity.py, not keyed
SHIPPED_SETTINGS = ("data", "seed", "steps", "lr", "lr_schedule", "lr_warmup_steps",
                    "weight_decay", "max_grad_norm", "prompts_per_step", "micro_batch_size",
                    "logit_chunk", "demo_slip", "dtype", "freeze_vision", "freeze_towers")
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TASK_MODULES = {"toy": arithmetic, "chains": chains, "shapes": shapes, "clips": clips}


def settings_key(sft_cfg: Config) -> str:
    """A short hash of a warm start's settings and its task's definition (its module's
    source), without the trainer's code or the library versions: what a shipped warm start is
    matched on (`shipped_warm_start`)."""
    import inspect
    settings = {k: getattr(sft_cfg, k) for k in SHIPPED_SETTINGS}
    parts = [TOY_VERSION, json.dumps(settings, sort_keys=True), repr(TOY_TEMPLATES),
             repr(demos.TOY_SFT_MIX), inspect.getsource(TASK_MODULES[sft_cfg.data])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def shipped_warm_start(cfg: Config, steps: int, name: str = "student") -> str | None:
    """The warm start shipped with the project (engine/toy/weights/TASK-student-seedS/) when
    its recorded settings are this run's, else None."""
    path = os.path.join(SHIPPED, f"{task_of(cfg)}-{name}-seed{cfg.seed}")
    try:
        with open(os.path.join(path, "warm_start.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    want = settings_key(_sft_config(cfg, steps, cfg.demo_slip))
    return path if recorded.get("settings") == want else None


def task_of(cfg: Config) -> str:
    """The embedded task the toy model is warm-started on: --data's, or arithmetic."""
    return cfg.data if cfg.data in data.TASKS else "toy"


def _sft_config(cfg: Config, steps: int, slip: float) -> Config:
    task = task_of(cfg)
    return resolve_config(dict(algo="sft", model="toy", data=task, steps=steps, seed=cfg.seed,
                               demo_slip=slip,
                               cache_dir=cfg.cache_dir, eval_every=0, save_every=0,
                               keep_checkpoints=1, eval_data=task, eval_n=cfg.eval_n,
                               log_every=max(1, steps // 20), overwrite=True, out="-"),
                          paths=False)  # it reads and writes only the cache (toy_checkpoint)


def warm_start_path(cfg: Config, *, steps: int, name: str, slip: float = None) -> str:
    """Where the cached warm start of these settings lives (built or not). `slip`: the
    demonstrator's (default: --demo-slip)."""
    slip = cfg.demo_slip if slip is None else slip
    prefix = "toy" if task_of(cfg) == "toy" else task_of(cfg)  # toy-..., shapes-...
    return os.path.join(cache_dir(cfg), f"{prefix}-{name}-sft{steps}-seed{cfg.seed}-"
                                        f"{warm_start_key(_sft_config(cfg, steps, slip))}")


def toy_checkpoint(cfg: Config, dist: Dist, *, steps: int, name: str,
                   slip: float = None) -> str:
    """The warm-started toy model, trained once (`build_warm_start`) and cached. Built under a
    file lock: a second process waits for the first one's instead of racing it."""
    slip = cfg.demo_slip if slip is None else slip
    sft_cfg = _sft_config(cfg, steps, slip)
    path = warm_start_path(cfg, steps=steps, name=name, slip=slip)
    if dist.rank == 0 and not os.path.exists(path):  # built: only read (a read-only cache)
        waiting = f"waiting for another process that is building the warm start {path}"
        with writing(cache_dir(cfg), "the warm start"), file_lock(path + ".lock", waiting):
            if not os.path.exists(path):
                minutes = steps * SFT_SECONDS[sft_cfg.data] / 60
                what = {"toy": "the ~0.3M-parameter toy Qwen3 on the arithmetic task",
                        "chains": "the ~0.3M-parameter toy Qwen3 on the worded chains task",
                        "shapes": "the tiny Qwen3-VL on the shapes task",
                        "clips": "the tiny Qwen2.5-Omni thinker on the clips task"}[sft_cfg.data]
                print(f"warm start ({name}): supervised fine-tuning of {what}, {steps} steps, "
                      f"about {minutes:.0f} minutes on 2 CPU cores. Done once: cached in {path}",
                      flush=True)
                build_warm_start(sft_cfg, Dist(device=dist.device), path)  # one local process
    dist.barrier()
    return path


def build_warm_start(cfg: Config, dist: Dist, path: str, label: str = "warm start: "):
    """The supervised fine-tuning that makes a warm start (`cfg`: its --algo sft settings),
    the same steps as `python train.py --algo sft` on the task, written to `path` as a Hugging
    Face model directory (atomically: a crash leaves no half-written warm start)."""
    torch.manual_seed(cfg.seed)
    examples = tasks.make_task(cfg.data, "train", 20000, seed=cfg.seed)
    model, tok = load_policy(cfg, dist, "toy")  # random weights (and towers taught)
    if cfg.freeze_vision or cfg.freeze_towers:  # as the trainer freezes them
        vision.freeze_towers(model, "the toy model", audio=cfg.freeze_towers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    t_start = time.time()
    for step in range(1, cfg.steps + 1):
        t0 = time.time()
        m = demos.sft_step_on(model, opt, examples, step, tok, cfg, dist)
        m["step_time_s"] = time.time() - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_line(step, cfg.steps, m, t_start, label)
    ckpt.save_model(path, model, tok)


def load_policy(cfg: Config, dist: Dist, name: str):
    """(model, tokenizer) for 'toy-init' (random), 'toy' (the cached warm start, built if it
    is not cached: see toy_checkpoint) or a path/hub id."""
    dtype = torch.float32  # master weights; bf16 compute comes from FSDP's policy or autocast
    if name == "toy-init" or (name == "toy" and cfg.algo == "sft"):  # --algo sft IS the warm start
        if task_of(cfg) == "shapes":
            model, tok = models.toy_vlm(seed=cfg.seed, **TOY_VLM)
            if name == "toy":  # the warm start: first its vision tower learns to see,
                shapes.teach_to_see(model, tok, seed=cfg.seed)
                # then the language model learns the task over the frozen tower (the toy's
                # --freeze-vision default), as a VLM's instruction tuning often does. Trained
                # along at 1e-3, the tower forgot how to see: after 1500 SFT steps a linear
                # probe read a token's cell from its features 23% of the time and its colour
                # 75% (teach_to_see's head: 100% and 100%), the common vector was back at 30x a
                # text embedding's norm, and greedy test accuracy stayed near the 54% of always
                # answering "one shape" (50% from a careful demonstrator). In RL at 2e-4 a trained tower broke in one
                # step: the first update sent the reward from 0.31 to 0.07, and the run ended
                # answering "one shape" to every picture
            return model.to(dist.device), tok
        if task_of(cfg) == "clips":
            model, tok = models.toy_omni(seed=cfg.seed, **TOY_OMNI)
            if name == "toy":  # first the towers learn to see and to hear (clips.teach_towers),
                # then the language model learns the task over them, frozen (--freeze-towers,
                # the clips task's default), as on the shapes task
                clips.teach_towers(model, tok, seed=cfg.seed)
            return model.to(dist.device), tok
        tok = models.build_toy_tokenizer(chains.CHARS if task_of(cfg) == "chains" else "")
        return models.build_toy_model(tok, seed=cfg.seed).to(dist.device), tok
    if name == "toy" and cfg.warm_start:  # an archived warm start (the study's --check)
        return load_model(cfg.warm_start, dtype=dtype, device=dist.device)
    shipped = (shipped_warm_start(cfg, cfg.warm_start_steps)
               if name == "toy" and not cfg.rebuild_warm_start else None)
    if shipped:  # the same settings: the weights that ship with the project, no SFT here
        if dist.rank == 0:
            print(f"warm start: the one shipped in {os.path.relpath(shipped)} (its settings are "
                  f"this run's; --rebuild-warm-start trains it here instead)", flush=True)
        return load_model(shipped, dtype=dtype, device=dist.device)
    if name == "toy":  # trained once, then read from the cache like any HF directory
        # Config.warm_start_steps (2400) is set by the slowest seed: the network learns to copy
        # a shown answer within ~500 SFT steps, but to compute the chain itself only later and
        # suddenly, at a step that depends on the seed (greedy test accuracy, student / shown
        # the answer: seed 0 32.8% / 45.8% at step 1300 on 500 problems; seeds 1 and 2,
        # `--algo sft --seed S --steps 2600 --eval-every 325 --eval-n 300`: still 4.7% / 90%
        # and 4.3% / 98% at 1300, then 31% / 89% and 25% / 82% at 1950, 31% / 93% and
        # 32% / 92% at 2600)
        name = toy_checkpoint(cfg, dist, steps=cfg.warm_start_steps, name="student")
    return load_model(name, dtype=dtype, device=dist.device)  # the same path as a real model


# the shapes task's tiny Qwen3-VL has this language model (the vision tower: models.toy_vlm)
# seconds per SFT step and per RL step on 2 CPU cores, measured (README "Run"): the toy with
# torch's 2 threads; shapes and clips with one thread beside another run, as the study runs
SFT_SECONDS = {"toy": 0.2, "chains": 0.3, "shapes": 0.3, "clips": 0.7}
RL_SECONDS = {"toy": 0.5, "chains": 1.0, "shapes": 0.8, "clips": 1.5}
TOY_VLM = dict(hidden=64, layers=2, head_dim=32)  # 2 heads: 4 M-RoPE frequencies per image axis
TOY_OMNI = dict(hidden=64, layers=2, head_dim=32)  # the clips task's tiny Qwen2.5-Omni thinker


def overview(cfg: Config) -> str:
    """What `python train.py` on the toy is about to do, and for how long, before the minutes
    of the warm start begin."""
    cached = os.path.exists(warm_start_path(cfg, steps=cfg.warm_start_steps, name="student"))
    shipped = not cfg.rebuild_warm_start and shipped_warm_start(cfg, cfg.warm_start_steps)
    warm = ("the shipped warm start" if shipped else "the cached warm start" if cached else
            f"first the one-time warm start (supervised fine-tuning, about "
            f"{cfg.warm_start_steps * SFT_SECONDS[task_of(cfg)] / 60:.0f} minutes on 2 CPU "
            f"cores, then cached)")
    task = {"toy": "the embedded toy task (arithmetic with carries, a ~0.3M-parameter Qwen3)",
            "chains": "the embedded chains task (arithmetic worked in words, on which a "
                      "shown reference can leak; a ~0.3M-parameter Qwen3)",
            "shapes": "the embedded shapes task (count the shapes of a colour in a picture, a "
                      "tiny Qwen3-VL)",
            "clips": "the embedded clips task (how many seconds of a clip show a colour, sound "
                     "a tone, or both; a tiny Qwen2.5-Omni thinker)"}[task_of(cfg)]
    return (f"--algo {cfg.algo} on {task}: {warm}, then {cfg.steps} RL steps (about "
            f"{RL_SECONDS[task_of(cfg)]:g} s each on 2 CPU cores). Outputs: {cfg.out}/.")
