"""How every embedded task draws the problems of a split, and trains its towers' probes.

    draw_split    n problems of train / test / ood from a task's generator: train and test
                  by a hash of the problem (so no test problem is ever trained on), the test
                  split without repeats, the out-of-distribution split as drawn
    probe_heads   temporary linear heads on a tower's features (the shapes and clips tasks'
                  stage 0: their towers learn to see and to hear before the warm start)
    train_probes  the loop that trains them: AdamW at 1e-3 decaying linearly to 0 (why: the
                  docstring of shapes.teach_to_see), gradients clipped to norm 1
"""
import random

import torch

from data import DataError

SPLITS = ("train", "test", "ood")


def draw_split(task: str, split: str, n: int, seed: int, *, make, split_of, key) -> list:
    """n problems of `split`: `make(rng, ood)` draws one, `split_of(ex)` says whether it is a
    train or test problem, `key(ex)` identifies it (the test split has no repeats)."""
    if split not in SPLITS:
        raise DataError(f"{task} split must be train, test or ood, got {split!r}")
    rng = random.Random(f"{task}-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        ex = make(rng, split == "ood")
        if split != "ood" and split_of(ex) != split:
            continue
        k = key(ex)
        if split == "test" and k in seen:  # a fixed test set of distinct problems
            continue
        seen.add(k)
        out.append(ex)
    return out


def probe_heads(hidden: int, sizes: tuple, seed: int) -> list:
    """One linear head per size on `hidden`-wide features, N(0, 1/hidden) weights from a
    generator of its own and zero biases (the layers are built first, then filled, in order)."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.nn.Linear(hidden, n) for n in sizes]
    for head in heads:
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * hidden ** -0.5)
            head.bias.zero_()
    return heads


def train_probes(params: list, steps: int, batch_loss):
    """`steps` updates of `params` on `batch_loss()` -> (loss, accuracies), at 1e-3 decaying
    linearly to 0; returns the last batch's accuracies."""
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    acc = None
    for _ in range(steps):
        loss, acc = batch_loss()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay.step()
    return acc
