"""Comparing two trainings that differ only in how the same work is split.

Micro-batches, LM-head chunks, a group's shared prompt forward, recomputed layers and the KV
cache's layout change the ORDER of float32 sums, never the math. Their results therefore
differ by rounding, and the comparison must be of something rounding cannot blow up: the
gradient of the FIRST optimizer update, before AdamW has acted. (After a few AdamW steps a
gradient component that is ~0 up to rounding has its sign, and so a full lr-sized step,
decided by rounding: values after optimizer steps are not comparable by any tolerance.)

The tolerance is derived, not tuned. A float32 dot product of length n has an error of at
most gamma_n = n u times the sum of its terms' magnitudes (Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., Sec. 3.1; u = 2^-24). A gradient element is a sum over the
batch's tokens of products along the network: forward and backward through L layers, each a
chain of dot products of length H (q, k, v, o, gate, up), I (down) and S (attention over the
sequence), then the LM head (H). So

    |g_a - g_b| <= 2 (n_tokens + 2 L (3 H + I + S) + H) u  x  sum over rows |g_row|

element-wise (first order; 2: both runs' errors), where g_row is one row's contribution
(recorded with one-row micro-batches). We apply it per parameter tensor in the 2-norm. The
same bound holds whatever the split, while a wrong normaliser or a dropped row changes the
gradient by a sizeable fraction of itself, far above it.
"""
import torch

import train
from engine import losses

U32 = 2.0 ** -24  # float32 unit roundoff


class FirstUpdate:
    """Records the first optimizer update of a run (train.main in this process): the
    gradient it applied (before clipping) and each micro-batch's contribution to it."""

    def __init__(self, monkeypatch):
        self.grads, self.parts, self.tokens, self.model = None, [], 0, None
        real_step, real_backward = train.clip_and_step, losses.backward_chunked

        def backward(model, b, *args, **kwargs):
            if self.grads is not None:  # after the first update: nothing more to record
                return real_backward(model, b, *args, **kwargs)
            before = {n: _grad(p) for n, p in model.named_parameters() if p.requires_grad}
            out = real_backward(model, b, *args, **kwargs)
            self.parts.append({n: _grad(p) - before[n] for n, p in model.named_parameters()
                               if p.requires_grad})
            self.tokens += int(b.mask.sum())
            return out

        def step(model, *args, **kwargs):
            if self.grads is None:
                self.model = model
                self.grads = {n: _grad(p) for n, p in model.named_parameters() if p.requires_grad}
            return real_step(model, *args, **kwargs)

        monkeypatch.setattr(losses, "backward_chunked", backward)
        monkeypatch.setattr(train, "clip_and_step", step)

    def magnitude(self) -> dict:
        """Per parameter: the sum over micro-batches of their contributions' 2-norms."""
        return {n: sum(float(p[n].norm()) for p in self.parts) for n in self.grads}


def _grad(p) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)


def chain_terms(model, seq_len: int) -> int:
    """2 L (3 H + I + S) + H: the dot products along one gradient element's path (above)."""
    c = model.config.get_text_config()
    L, H, I = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    return 2 * L * (3 * H + I + seq_len) + H


def assert_same_update(a: FirstUpdate, b: FirstUpdate, *, seq_len: int):
    """The two runs' first-update gradients agree within the float32 bound above; the
    per-row magnitudes come from whichever run recorded the finer split."""
    assert a.grads is not None and b.grads is not None, "a run took no optimizer step"
    assert a.grads.keys() == b.grads.keys()
    fine = a if len(a.parts) >= len(b.parts) else b
    terms = fine.tokens + chain_terms(fine.model, seq_len)
    mag = fine.magnitude()
    moved = 0
    for n in a.grads:
        diff = float((a.grads[n] - b.grads[n]).norm())
        bound = 2 * terms * U32 * mag[n]
        assert diff <= bound, (n, diff, bound, float(a.grads[n].norm()))
        moved += float(a.grads[n].norm()) > 0
    assert moved, "every gradient is zero: nothing was compared"
