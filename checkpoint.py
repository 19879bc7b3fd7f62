"""Checkpoints that survive being killed at any moment, and load anywhere with from_pretrained.

A checkpoint is a Hugging Face model directory (model.safetensors, config.json, tokenizer
files) plus what exact resume needs:
    trainer_state.pt      step, optimizer state, the rank-0 config, per-rank RNG states
    teacher.safetensors   the teacher's weights when they differ from both the student and the
                          initial model (a synced frozen copy, an EMA)

It is written to `<out>/checkpoint-000042.tmp/` and renamed to `checkpoint-000042/` only when
complete; a rename within a directory is atomic, so a crash leaves either the old set of
checkpoints or the new one, never a half-written directory that `--resume` would pick.
"""
import dataclasses
import os
import re
import shutil

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from distributed import full_state_dict, load_full_state_dict

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _plain(state_dict: dict, tied: bool) -> dict:
    """CPU tensors that safetensors accepts: no shared storage, no tied duplicate."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    if tied:  # from_pretrained re-ties lm_head to the embeddings
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(out_dir: str, step: int, *, model_state: dict, model_config, tokenizer,
                    trainer_state: dict, teacher_state: dict | None = None, keep: int = 3) -> str:
    """Rank 0 only. Writes atomically, then deletes all but the newest `keep` checkpoints."""
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # debris of a write that crashed (rank 0 is the only writer)
        if name.startswith("checkpoint-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(tmp)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    save_file(_plain(model_state, tied), os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    model_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    if teacher_state is not None:
        save_file(_plain(teacher_state, tied), os.path.join(tmp, "teacher.safetensors"))
    for f in os.listdir(tmp):  # make the bytes durable before the rename publishes them
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a .tmp directory is never complete)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.exists(os.path.join(path, "trainer_state.pt")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str) -> str | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu",
                      weights_only=False)


def load_teacher_state(path: str) -> dict | None:
    f = os.path.join(path, "teacher.safetensors")
    return load_file(f) if os.path.exists(f) else None


# ----------------------------------------------------------------------------------------
# The trainer's side: gather (FSDP) state, save on rank 0, restore on every rank
# ----------------------------------------------------------------------------------------

def save(model, opt, teacher, tok, gen, cfg, dist, step: int):
    """Gather the full (unsharded) state on rank 0 and write one checkpoint; every rank waits."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    state = full_state_dict(model, dist)
    if dist.world > 1:
        optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        rngs = [None] * dist.world
        tdist.all_gather_object(rngs, gen.get_state())
    else:
        optim, rngs = opt.state_dict(), [gen.get_state()]
    t_state = full_state_dict(teacher.model, dist) if teacher.has_state else None
    if dist.rank == 0:
        save_checkpoint(cfg.out, step, model_state=state, model_config=model.config,
                             tokenizer=tok, keep=cfg.keep_checkpoints, teacher_state=t_state,
                             trainer_state=dict(step=step, optimizer=optim, rng=rngs,
                                                config=dataclasses.asdict(cfg)))
    dist.barrier()


def restore(model, opt, teacher, gen, cfg, dist) -> int:
    """Continue from the newest complete checkpoint in --out: weights, optimizer, RNG, teacher."""
    path = latest_checkpoint(cfg.out)
    if path is None:
        raise SystemExit(f"--resume: no complete checkpoint in {cfg.out}")
    state = load_trainer_state(path)
    load_full_state_dict(model, load_file(os.path.join(path, "model.safetensors")), dist)
    if dist.world > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(model, opt, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    if len(state["rng"]) != dist.world:
        raise SystemExit(f"--resume: checkpoint was written by {len(state['rng'])} processes, "
                         f"this run has {dist.world}")
    gen.set_state(state["rng"][dist.rank])
    if teacher.has_state:
        t_state = load_teacher_state(path)
        if t_state is None:
            raise SystemExit(f"--resume: {path} has no teacher.safetensors, but "
                             f"--teacher-mode {cfg.teacher_mode} needs the teacher's weights")
        load_full_state_dict(teacher.model, t_state, dist)
    if dist.rank == 0:
        print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]
