"""The trainer's teachers: RLSD's periodic sync, SDPO's EMA, no gradient ever (spec RLSD 1.8.9,
SDPO 3.8.5 and 3.8.7)."""
import copy
from types import SimpleNamespace

import torch

from algos import Teacher


def _pair():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    return student, copy.deepcopy(student)


def _cfg(mode, **kw):
    return SimpleNamespace(teacher_mode=mode, teacher_sync=3, teacher_ema=0.25, **kw)


def _snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


def test_sync_copies_the_student_every_n_steps_only():
    student, initial = _pair()
    teacher = Teacher(_cfg("sync"), initial)
    for step in range(1, 7):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)  # an optimizer step
        before = _snapshot(teacher.model)
        teacher.after_step(student, step)
        after = _snapshot(teacher.model)
        if step % 3 == 0:
            assert all(torch.equal(a, s) for a, s in zip(after, student.parameters()))
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_ema_update_rule_and_frozen_teacher():
    student, initial = _pair()
    teacher = Teacher(_cfg("ema"), initial)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-2.0)
    old = _snapshot(teacher.model)
    teacher.after_step(student, 1)
    for t, o, s in zip(teacher.model.parameters(), old, student.parameters()):
        torch.testing.assert_close(t, 0.75 * o + 0.25 * s)
    frozen = Teacher(_cfg("frozen"), copy.deepcopy(initial))
    before = _snapshot(frozen.model)
    frozen.after_step(student, 3)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(frozen.model), before))


def test_teacher_forward_carries_no_gradient():
    class Tiny(torch.nn.Module):  # stands in for a causal LM: logits = embedding of the ids
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 5)

            self.head = torch.nn.Linear(5, 5, bias=False)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, logits_to_keep=0, **_):
            return SimpleNamespace(logits=self.head(self.emb(input_ids)[:, -logits_to_keep:]))

    student, initial = Tiny(), Tiny()
    ids, mask = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    for mode, init in (("frozen", initial), ("live", None), ("trust", initial)):
        logits = Teacher(_cfg(mode), init).chunked(student, ids, mask, ids, mask)
        z = logits(0, 2)
        assert z.shape == (1, 2, 5) and not z.requires_grad
        assert torch.equal(logits(1, 2), z[:, 1:])
