"""The trainer's teachers: RLSD's periodic sync, SDPO's EMA, no gradient ever (spec RLSD 1.8.9,
SDPO 3.8.5 and 3.8.7), and the no-grad scorer of sampled tokens."""
import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

import grpo
import rollout
import teachers
from rollout import build_toy_model, build_toy_tokenizer, checkpoint_layers
from teachers import Teacher, sampled_token_logprobs


def _pair():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    return student, copy.deepcopy(student)


def _teacher(mode, model):
    return Teacher(mode, model, sync_every=3, ema_rate=0.25)


def _snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


def test_sync_copies_the_student_every_n_steps_only():
    student, initial = _pair()
    teacher = _teacher("sync", initial)
    for step in range(1, 7):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)  # an optimizer step
        before = _snapshot(teacher.model)
        teacher.update(student, step)
        after = _snapshot(teacher.model)
        if step % 3 == 0:
            assert all(torch.equal(a, s) for a, s in zip(after, student.parameters()))
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_ema_update_rule_and_frozen_teacher():
    student, initial = _pair()
    teacher = _teacher("ema", initial)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-2.0)
    old = _snapshot(teacher.model)
    teacher.update(student, 1)
    for t, o, s in zip(teacher.model.parameters(), old, student.parameters()):
        torch.testing.assert_close(t, 0.75 * o + 0.25 * s)
    frozen = _teacher("frozen", copy.deepcopy(initial))
    before = _snapshot(frozen.model)
    frozen.update(student, 3)
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
        logits = _teacher(mode, init).logits(student, ids, mask, ids, mask)
        z = logits(0, 2)
        assert z.shape == (1, 2, 5) and not z.requires_grad
        # a chunk is a matrix product of another shape, whose summation order BLAS may choose
        # differently: equal to the float32 rounding, not bit for bit
        torch.testing.assert_close(logits(1, 2), z[:, 1:], rtol=1.3e-6, atol=1e-6)
        with torch.enable_grad():  # no gradient even when asked from inside a loss
            assert not logits(0, 1).requires_grad


def test_sampled_token_logprobs_are_the_chunked_token_logprobs():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    out = sampled_token_logprobs(lambda t0, t1: z[:, t0:t1], tokens, temperature=1.3,
                                 chunks=[(0, 2), (2, 5)])
    assert torch.equal(out, torch.cat([grpo.token_logprobs(z[:, :2], tokens[:, :2], temperature=1.3),
                                       grpo.token_logprobs(z[:, 2:], tokens[:, 2:], temperature=1.3)], 1))
    torch.testing.assert_close(out, torch.log_softmax(z / 1.3, -1).gather(-1, tokens[..., None])[..., 0])


def test_sync_is_due_by_the_step_even_when_the_update_was_skipped():
    """RLSD's trainer syncs at step % N == 0 regardless (audit F17); the EMA waits for a taken
    update (SDPO `_update_teacher`)."""
    student, initial = _pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    sync = _teacher("sync", initial)
    sync.update(student, 3, skipped=True)
    assert all(torch.equal(a, s) for a, s in zip(sync.model.parameters(), student.parameters()))
    ema = _teacher("ema", copy.deepcopy(initial))
    before = _snapshot(ema.model)
    ema.update(student, 3, skipped=True)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(ema.model), before))


# ----------------------------------------------------------------------------------------
# A group's prompt runs once (teachers.shared_prompt_forward): the same numbers as per row
# ----------------------------------------------------------------------------------------

def _rows(P, G, seed, tok):
    """P left-padded prompts of different lengths, each repeated G times, responses that end
    at different lengths, rows shuffled so a group need not be contiguous (a micro-batch may
    hold part of a group)."""
    g = torch.Generator().manual_seed(seed)
    V, Lp, T = len(tok), 6, 5
    ids = torch.randint(3, V, (P, Lp), generator=g)
    mask = torch.ones_like(ids)
    for p in range(P):
        mask[p, :p % Lp] = 0
    ids[mask == 0] = tok.pad_token_id
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    resp = torch.randint(3, V, (P * G, T), generator=g)
    rmask = (torch.arange(T)[None] < torch.randint(1, T + 1, (P * G, 1), generator=g)).long()
    order = torch.randperm(P * G, generator=g)
    return ids[order], mask[order], resp[order], rmask[order]


@pytest.fixture(scope="module")
def monkeypatch_module():  # hypothesis runs one test many times: a fixture it may share
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _scored(monkeypatch, share, fn, model, rows):
    monkeypatch.setattr(rollout, "SHARE_PROMPTS", share)
    model.zero_grad()
    out = fn(model, *rows)
    (out.sin() * rows[3][..., None]).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@settings(max_examples=12, deadline=None)
@given(P=st.integers(1, 3), G=st.integers(1, 4), seed=st.integers(0, 10**6),
       hidden=st.booleans())
def test_shared_prompt_forward_gives_the_per_row_forward_and_gradient(monkeypatch_module, P, G,
                                                                      seed, hidden):
    """Each distinct prompt once, its KV cache gathered out to its rows: the logits (or hidden
    states) of every response position and every parameter's gradient are the per-row
    forward's, with left padding, responses of different lengths and groups not contiguous."""
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, seed=0)
    rows = _rows(P, G, seed, tok)
    fn = teachers.response_hidden if hidden else teachers.response_logits
    shared_fn = []
    monkeypatch_module.setattr(teachers, "shared_prompt_forward",
                               _recording(_SHARED_PROMPT_FORWARD, shared_fn))
    a, ga = _scored(monkeypatch_module, False, fn, model, rows)
    b, gb = _scored(monkeypatch_module, True, fn, model, rows)
    assert shared_fn == ([False, True] if G > 1 else [False, False])  # it ran where rows repeat
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * max(1.0, y.abs().max().item()))


_SHARED_PROMPT_FORWARD = teachers.shared_prompt_forward


def _recording(fn, log):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        log.append(out is not None)
        return out
    return wrapped


def test_shared_prompt_forward_is_off_under_activation_checkpointing():
    """A layer recomputed in backward would write its keys into the cache twice: with
    checkpointing on and grad enabled, the plain forward runs."""
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, seed=0)
    rows = _rows(2, 3, 0, tok)
    ref = teachers.response_logits(model, *rows)
    checkpoint_layers(model)
    model.train()
    assert teachers.shared_prompt_forward(model, *rows, lambda out: out.logits) is None
    torch.testing.assert_close(teachers.response_logits(model, *rows), ref)
    with torch.no_grad():  # nothing is recomputed without a backward: shared again
        shared = teachers.shared_prompt_forward(model, *rows, lambda out: out.logits)
    torch.testing.assert_close(shared, ref, rtol=1e-5, atol=1e-5)
