"""Distributed code at the edges: the same calls work in one process and under torchrun.

Under `torchrun` each process gets RANK / WORLD_SIZE / LOCAL_RANK: we use gloo on CPU and
nccl on GPU, and shard models with FSDP2 (`fully_shard` per decoder layer, then the root).
Under plain `python` there is one process and every helper here is a no-op.
"""
import contextlib
import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def sum(self, x):
        """All-reduced sum of a float or tensor (a no-op in one process)."""
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.world > 1:
            tdist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            tdist.barrier()


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: gloo on CPU, nccl on GPU. Plain python: one process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if cuda else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), device)


def teardown(dist: Dist):
    """End the process group at exit (torchrun); nothing to do in one process."""
    if dist.world > 1:
        tdist.destroy_process_group()


def shard(model, dist: Dist, dtype):
    """FSDP2: each decoder layer, then the root. Parameters stay float32 masters; bf16 compute."""
    if dist.world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for m in model.modules():  # the language model's layers, a vision tower's blocks, an audio tower's layers
        if type(m).__name__.endswith(("DecoderLayer", "VisionBlock", "EncoderLayer")):
            fully_shard(m, mp_policy=mp)
    # the root (embeddings, final norm, LM head) stays gathered after forward: the chunked loss
    # applies the LM head outside the model's forward, and FSDP reduce-scatters the root's
    # gradients in its final post-backward callback, after every chunk has contributed
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


class gathered:
    """Unshard an FSDP2 model once for a whole generation phase, instead of per token."""

    def __init__(self, model):
        self.model = model
        self.fsdp = hasattr(model, "unshard")

    def __enter__(self):
        if self.fsdp:
            self.model.unshard()
            self.model.set_reshard_after_forward(False)
        return self.model

    def __exit__(self, *exc):
        if self.fsdp:
            self.model.set_reshard_after_forward(True)
            self.model.set_reshard_after_forward(False, recurse=False)  # the root: see shard()
            self.model.reshard()


def full_state_dict(model, dist: Dist) -> dict:
    if dist.world == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def load_full_state_dict(model, state: dict, dist: Dist):
    """Load a full state dict into a (sharded) model. Keys may be missing (a tied lm_head, the
    frozen base of a LoRA model), never unknown: a name that matches no parameter is an error,
    not a silent no-op."""
    if dist.world == 1:
        result = model.load_state_dict(state, strict=False)
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)
        result = set_model_state_dict(model, state, options=StateDictOptions(
            full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise ValueError(f"{len(result.unexpected_keys)} saved tensors match no parameter of "
                         f"the model, e.g. {result.unexpected_keys[0]}")


def autocast(dtype_name: str, dist: Dist):
    """bf16 compute for one process (float32 master weights). Under FSDP2 the
    MixedPrecisionPolicy in `shard` does this instead."""
    if dtype_name == "bfloat16" and dist.world == 1:
        return torch.autocast(dist.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; after that,
# the vocabulary-sized blocks of a wide LM head (rows x 151,936 floats: 2.4 MB for 4 rows, in
# every decode step and every loss chunk) come from the heap, fragment, and stay resident: one
# RLSD step at V = 151,936 peaked at 14.2 GB of RSS instead of 1.4 GB (tools/BENCH.md). A fixed
# 512 KiB threshold gives every block of one row of logits or more its own mmap, returned to
# the OS when freed (4 MiB was not enough with 4 rollouts: 2.7 GB RLSD, 5.1 GB SDPO). Only for
# wide vocabularies on CPU: the toy (V = 31) and GPU runs never take this path.
WIDE_VOCAB, MMAP_THRESHOLD = 32768, 512 << 10


def release_large_blocks(model, device: torch.device) -> bool:
    """Set glibc's mmap threshold to 512 KiB (process-wide) when `model` has a wide LM head
    and runs on the CPU; a MALLOC_MMAP_THRESHOLD_ in the environment is left to win. Returns
    whether it was set."""
    if (device.type != "cpu" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or model.get_output_embeddings().weight.shape[0] < WIDE_VOCAB):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def reshard(*models):
    """Put FSDP2 models back in their sharded state. The root module of a model that ran only
    no-grad forwards (a teacher) keeps its gathered parameters, which cannot be mixed with the
    student's sharded ones in an in-place update."""
    for m in models:
        if hasattr(m, "reshard"):
            m.reshard()


class Stopwatch:
    """Wall time per phase of a step. On a GPU the device is synchronised at each edge, so
    asynchronous kernels are charged to the phase that launched them."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0
