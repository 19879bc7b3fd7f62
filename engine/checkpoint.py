"""Checkpoints that survive being killed at any moment, and load anywhere with from_pretrained.

A checkpoint is a Hugging Face model directory (model.safetensors, config.json, tokenizer
files; with LoRA a PEFT adapter directory instead: adapter_model.safetensors and
adapter_config.json, the adapters only) plus what exact resume needs:
    trainer_state.pt      step, optimizer state, the rank-0 config, per-rank RNG states
    teacher.safetensors   the teacher's weights when they differ from both the student and the
                          initial model (a synced frozen copy, an EMA)

It is written to `<out>/checkpoint-000042.tmp/` and renamed to `checkpoint-000042/` only when
complete; a rename within a directory is atomic, so a crash leaves either the old set of
checkpoints or the new one, never a half-written directory that `--resume` would pick.
"""
import dataclasses
import os
import pickle
import shutil

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from engine import lora, vision
from engine.distributed import full_state_dict, load_full_state_dict
from engine.rundir import latest_checkpoint, list_checkpoints, writing  # noqa: F401


def _plain(state_dict: dict, tied: bool) -> dict:
    """CPU tensors that safetensors accepts: no shared storage, no tied duplicate."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    if tied:  # from_pretrained re-ties lm_head to the embeddings
        sd.pop("lm_head.weight", None)
    return sd


def _written(write, path: str, *args, **kwargs):
    """write(..., path) with any failure as an OSError: safetensors raises its own
    SafetensorError on a full disk and torch.save an opaque RuntimeError ("unexpected pos"),
    so that the trainer's one message for a failed write (rundir.writing) covers them too."""
    try:
        write(*args, path, **kwargs)
    except OSError:
        raise
    except Exception as e:  # only ever a failed write of this one file
        raise OSError(f"{os.path.basename(path)}: {type(e).__name__}: {str(e)[:200]}") from None


POLICY_FILE = "rollout_policy.safetensors"  # --rollout-refresh K > 1: the rollout policy


def save_checkpoint(out_dir: str, step: int, *, model_state: dict, model_config, tokenizer,
                    trainer_state: dict, teacher_state: dict | None = None, keep: int = 3,
                    lora_model=None, extra_files: dict | None = None) -> str:
    """Rank 0 only. Writes atomically, then deletes all but the newest `keep` checkpoints.
    With `lora_model` (a PEFT model) the states are its adapters (lora.adapter_state)."""
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # debris of a write that crashed (rank 0 is the only writer)
        if name.startswith("checkpoint-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_files(tmp, model_state=model_state, model_config=model_config,
                     tokenizer=tokenizer, trainer_state=trainer_state,
                     teacher_state=teacher_state, lora_model=lora_model,
                     extra_files=extra_files or {})
    except BaseException:  # a full disk: give back what the half-written copy took
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: str, *, model_state, model_config, tokenizer, trainer_state, teacher_state,
                 lora_model, extra_files: dict = {}):
    """Every file of a checkpoint into the directory `tmp`, each made durable (fsync)."""
    tied = lora_model is None and bool(getattr(model_config, "tie_word_embeddings", False))
    if lora_model is None:
        _written(save_file, os.path.join(tmp, "model.safetensors"), _plain(model_state, tied),
                 metadata={"format": "pt"})
        model_config.save_pretrained(tmp)
    else:  # PeftModel.from_pretrained(base, checkpoint) loads these two files
        _written(save_file, os.path.join(tmp, lora.ADAPTER_WEIGHTS), _plain(model_state, False),
                 metadata={"format": "pt"})
        lora.save_adapter_config(lora_model, tmp)
    tokenizer.save_pretrained(tmp)
    vision.save_processors(tokenizer, tmp)  # a multimodal model's: image, audio, video settings
    if trainer_state is not None:
        _written(torch.save, os.path.join(tmp, "trainer_state.pt"), trainer_state)
    if teacher_state is not None:
        _written(save_file, os.path.join(tmp, "teacher.safetensors"), _plain(teacher_state, tied))
    for name, state in extra_files.items():  # weights of another copy (the rollout policy)
        _written(save_file, os.path.join(tmp, name), _plain(state, tied))
    for f in os.listdir(tmp):  # make the bytes durable before the rename publishes them
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())


def save_model(path: str, model, tokenizer):
    """A plain Hugging Face model directory (weights, config, tokenizer, processors; no
    trainer state) at `path`, written to `path`.tmp and renamed when complete (the toy warm
    start: a crash leaves none, never half of one)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_files(tmp, model_state=model.state_dict(), model_config=model.config,
                     tokenizer=tokenizer, trainer_state=None, teacher_state=None, lora_model=None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, path)


class UnsafeCheckpoint(Exception):
    """A trainer_state.pt that holds more than tensors and plain values: not loaded."""


def load_trainer_state(path: str) -> dict:
    """The step, AdamW state, RNG states and config of a checkpoint. Read with
    weights_only=True: a pickle can name any function to call while it is read, so a
    trainer_state.pt crafted by someone else would run code the moment a run resumed from it.
    This project writes only tensors, numbers, strings, lists and dicts, which is all that
    weights_only admits; anything else is refused (UnsafeCheckpoint), never executed."""
    f = os.path.join(path, "trainer_state.pt")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only raises for a forbidden object
        if "Weights only load failed" not in str(e):
            raise  # a damaged file: the caller tries the checkpoint before it
        first = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:160]
        raise UnsafeCheckpoint(f"{f} holds objects other than tensors and plain values "
                               f"({first}); it was not written by this project, and loading it "
                               f"could run code, so it is not loaded") from None


def load_teacher_state(path: str) -> dict | None:
    f = os.path.join(path, "teacher.safetensors")
    return load_file(f) if os.path.exists(f) else None


# ----------------------------------------------------------------------------------------
# The trainer's side: gather (FSDP) state, save on rank 0, restore on every rank
# ----------------------------------------------------------------------------------------

def save(model, opt, teacher, tok, gen, cfg, dist, step: int, replay=None):
    """Gather the full (unsharded) state on rank 0 and write one checkpoint; every rank waits.
    A failed write (disk full, permissions) stops the run with one message; the checkpoints
    written before stay intact (the half-written one is a .tmp directory, never picked).
    `replay` (--rollout-refresh): every rank's cached rollouts, and a refreshed rollout policy."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    adapters = lora.is_lora(model)  # then only the adapters are saved (the base is frozen)
    state = full_state_dict(model, dist)
    state = lora.adapter_state(state) if adapters else state
    if dist.world > 1:
        optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        rngs = [None] * dist.world
        tdist.all_gather_object(rngs, gen.get_state())
    else:
        optim, rngs = opt.state_dict(), [gen.get_state()]
    t_state = full_state_dict(teacher.model, dist) if teacher.has_state else None
    if t_state is not None and adapters:
        t_state = lora.adapter_state(t_state)
    extra, extra_files = {}, {}
    if replay is not None:
        caches = [replay.state()]
        if dist.world > 1:
            caches = [None] * dist.world
            tdist.all_gather_object(caches, replay.state())
        extra["replay"] = caches
        if replay.has_state:
            p_state = full_state_dict(replay.policy, dist)
            extra_files[POLICY_FILE] = lora.adapter_state(p_state) if adapters else p_state
    if dist.rank == 0:
        with writing(cfg.out, f"the step-{step} checkpoint", f"Earlier checkpoints are intact "
                     f"(newest: {latest_checkpoint(cfg.out)})"):
            save_checkpoint(cfg.out, step, model_state=state, model_config=model.config,
                            tokenizer=tok, keep=cfg.keep_checkpoints, teacher_state=t_state,
                            trainer_state=dict(step=step, optimizer=optim, rng=rngs,
                                               config=dataclasses.asdict(cfg),
                                               data=data_fingerprint(cfg.data), **extra),
                            lora_model=model if adapters else None,
                            extra_files=extra_files)
    dist.barrier()


def restore_replay(replay, cfg, dist, step: int):
    """The cached rollouts (this rank's) and a refreshed rollout policy of checkpoint `step`."""
    path = os.path.join(cfg.out, f"checkpoint-{step:06d}")
    state = load_trainer_state(path)
    caches = state.get("replay")
    if caches is None or len(caches) != dist.world:
        raise SystemExit(f"--resume: {path} holds no rollout cache for {dist.world} "
                         f"process(es); it was not written with --rollout-refresh "
                         f"{cfg.rollout_refresh}")
    replay.load_state(caches[dist.rank])
    if replay.has_state:
        p_state = load_file(os.path.join(path, POLICY_FILE))
        load_full_state_dict(replay.policy, lora.model_state(p_state) if cfg.lora_rank
                             else p_state, dist)


RESUME_KEYS = ("algo", "model", "teacher", "data", "seed", "warm_start_steps", "warm_start", "lora_rank",
               "lora_targets", "rollout_refresh")


def data_fingerprint(path: str) -> str:
    """What --resume compares besides the --data path: the file's size and a hash of its
    first and last megabyte (the whole file when smaller), so a file rewritten in place is
    noticed without reading gigabytes. '' for an embedded task."""
    if not os.path.isfile(path):
        return ""
    import hashlib
    size, h, mb = os.path.getsize(path), hashlib.sha256(), 1 << 20
    with open(path, "rb") as f:
        h.update(f.read(mb))
        if size > 2 * mb:
            f.seek(size - mb)
        h.update(f.read(mb))
    return f"{size}:{h.hexdigest()[:16]}"


def check_resumable(saved: dict, cfg) -> None:
    """Refuse to resume a run under another algorithm, model, teacher, data or seed: the
    checkpoint's weights and optimizer state belong to the saved run."""
    now = dataclasses.asdict(cfg)
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS
            if k in saved and saved[k] != now[k]]
    if diff:
        raise SystemExit(f"--resume: {cfg.out} holds a run with other settings ({'; '.join(diff)}); "
                         f"give the saved values, or start a new run with another --out")


def load_verified(path: str, cfg, need_teacher: bool):
    """(trainer_state, model_state, teacher_state) of one checkpoint, every file read in full;
    raises ValueError naming the file that does not load (truncated, corrupt), and SystemExit
    if the checkpoint belongs to a run with other settings."""
    def read(name, loader):
        try:
            value = loader(path)
        except UnsafeCheckpoint:
            raise
        except Exception as e:  # torch and safetensors raise many types for a damaged file
            raise ValueError(f"{name}: {type(e).__name__}: {str(e)[:200]}") from None
        if value is None:
            raise ValueError(f"{name} is missing, and the teacher's weights are needed")
        return value
    try:
        state = read("trainer_state.pt", load_trainer_state)
    except UnsafeCheckpoint as e:  # never "damaged, try the one before": someone put it there
        raise SystemExit(f"--resume: {e}. Resume only from run directories you trust.") from None
    check_resumable(state.get("config", {}), cfg)
    if state.get("data") not in (None, data_fingerprint(cfg.data)):
        raise SystemExit(f"--resume: --data {cfg.data} is not the file {path} was trained on "
                         f"(its size or contents changed since); resume with that file, or "
                         f"start a new run with another --out")
    weights = lora.ADAPTER_WEIGHTS if cfg.lora_rank else "model.safetensors"
    model_state = read(weights, lambda p: load_file(os.path.join(p, weights)))
    t_state = read("teacher.safetensors", load_teacher_state) if need_teacher else None
    if cfg.lora_rank:  # the files' adapter names -> the model's parameter names
        model_state = lora.model_state(model_state)
        t_state = lora.model_state(t_state) if t_state is not None else None
    return state, model_state, t_state


def restore(model, opt, teacher, gen, cfg, dist) -> int:
    """Continue from the newest complete checkpoint in --out that loads: weights, optimizer,
    RNG, teacher. A damaged checkpoint (a file that does not load) is reported and skipped
    for the one before it."""
    candidates = list_checkpoints(cfg.out)[::-1]
    if not candidates:
        raise SystemExit(f"--resume: no complete checkpoint in {cfg.out}")
    for path in candidates:
        try:
            state, model_state, t_state = load_verified(path, cfg, teacher.has_state)
            break
        except ValueError as e:
            if dist.rank == 0:
                print(f"--resume: {path} is damaged ({e}); trying the checkpoint before it",
                      flush=True)
    else:
        raise SystemExit(f"--resume: no checkpoint in {cfg.out} loads (all damaged)")
    if len(state["rng"]) != dist.world:  # before anything is loaded into the model
        raise SystemExit(f"--resume: checkpoint was written by {len(state['rng'])} processes, "
                         f"this run has {dist.world}")
    try:
        load_full_state_dict(model, model_state, dist)
    except (ValueError, RuntimeError) as e:  # another model shape (a size mismatch) or LoRA
        first = str(e).strip().splitlines()[-1][:200]
        raise SystemExit(f"--resume: {path} does not fit this model ({first}); was --model "
                         f"replaced since?") from None
    if dist.world > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(model, opt, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"][dist.rank])
    if teacher.has_state:
        load_full_state_dict(teacher.model, t_state, dist)
    if dist.rank == 0:
        print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]
