"""--distill-agg (docs/fidelity.md F3, F4, F9): each mode on a hand-computed batch, and the trainer's
gradient unchanged by how a batch is split into micro-batches, for every mode."""
from types import SimpleNamespace

import pytest
import torch

from engine import losses
from engine.losses import Norms
from rounding import assert_same_update
from test_train import SEQ, first_updates

# 4 rows; tokens per row 3, 1, 2, 2; rows 0 and 2 are distilled
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
DISTILL = torch.tensor([True, False, True, False])
DIV = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [4.0, 8.0, 9.0], [9.0, 9.0, 9.0]])


def term(mode):
    b = SimpleNamespace(mask=MASK, distill=DISTILL)
    norms = Norms(tokens=8, rows=4, rows_x_len=12, distill_tokens=5, distill_rows=2)
    w = losses.distill_row_weights(mode, b, norms)
    return float((DIV * w[:, None] * (MASK & DISTILL[:, None])).sum())


def test_each_mode_by_hand():
    assert term("token-mean") == pytest.approx((1 + 2 + 3 + 4 + 8) / 5)
    assert term("seq-mean") == pytest.approx((6 / 3 + 12 / 2) / 2)            # OPSD paper
    assert term("seq-mean-all-rows") == pytest.approx((6 / 3 + 12 / 2) / 4)   # SDPO official
    # PTD-PO official: micro-batches of 2 rows; each its PTD token mean x its share of tokens
    assert term("micro-batch-mean") == pytest.approx((4 / 8) * (6 / 3) + (4 / 8) * (12 / 2))
    with pytest.raises(ValueError):
        term("row-mean")


@pytest.mark.parametrize("algo,mode", [("opsd", "seq-mean"), ("sdpo", "seq-mean-all-rows"),
                                       ("ptdpo", "micro-batch-mean"), ("sdpo", "token-mean")])
def test_distill_modes_are_split_invariant(tmp_path, cache, monkeypatch, algo, mode):
    """The whole batch in one micro-batch and one row per micro-batch: the same first update,
    within float32 rounding (tests/rounding.py)."""
    extra = ["--group-size", "1", "--prompts-per-step", "6"] if algo == "opsd" else []
    args = ("--algo", algo, "--distill-agg", mode, "--top-k", "5", *extra)
    whole, split = first_updates(tmp_path, cache, monkeypatch, args, (),
                                 ("--micro-batch-size", "1"))
    assert_same_update(whole, split, seq_len=SEQ)
