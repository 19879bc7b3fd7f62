"""The trainer's teachers: RLSD's periodic sync, SDPO's EMA, no gradient ever (spec RLSD 1.8.9,
SDPO 3.8.5 and 3.8.7), and the no-grad scorer of sampled tokens."""
import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine import rollout, teachers
from engine.rollout import checkpoint_layers
from engine.toy.models import build_toy_model, build_toy_tokenizer
from engine.teachers import Teacher, sampled_token_logprobs


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
    with torch.enable_grad():  # no gradient even when asked from inside a loss
        for mode, init in (("frozen", initial), ("live", None), ("trust", initial)):
            teacher = _teacher(mode, init)
            hidden = teacher.hidden(student, ids, mask, ids, mask)
            z = teacher.logits(student, hidden, 0, 2)
            assert z.shape == (1, 2, 5) and not z.requires_grad
            assert not any(h.requires_grad for h in hidden)
            # a chunk is a matrix product of another shape, whose summation order BLAS may
            # choose differently: equal to the float32 rounding, not bit for bit
            torch.testing.assert_close(teacher.logits(student, hidden, 1, 2), z[:, 1:],
                                       rtol=1.3e-6, atol=1e-6)
            if mode == "trust":  # SDPO's trust region: the two models' logits, lerped
                at = torch.tensor([[2, 1]])  # the tokens at the positions predicting the response
                own = initial.head(initial.emb(at))
                torch.testing.assert_close(z, torch.lerp(own, student.head(student.emb(at)),
                                                         0.25))
                with pytest.raises(ValueError, match="mixes two models"):
                    teacher.scorer(student)
            else:
                assert teacher.scorer(student) is (student if mode == "live" else init)


def test_sampled_token_logprobs_are_the_full_forwards_log_softmax():
    """One forward per `rows` rows, the LM head per chunk of positions: the log-probs of the
    sampled tokens under softmax(z / T) of the model's own full forward, for any split."""
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, seed=0)
    ids, mask, resp, rmask = _rows(3, 2, 0, tok)
    z = teachers.response_logits(model, ids, mask, resp, rmask)
    want = torch.log_softmax(z / 1.3, -1).gather(-1, resp[..., None])[..., 0]
    for rows, chunk in ((0, -1), (4, 2), (1, 1)):
        out = sampled_token_logprobs(model, ids, mask, resp, rmask, temperature=1.3,
                                     rows=rows, logit_chunk=chunk)
        assert out.shape == resp.shape and not out.requires_grad
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_sync_is_due_by_the_step_even_when_the_update_was_skipped():
    """RLSD's trainer syncs at step % N == 0 regardless (docs/fidelity.md F17); the EMA waits for a taken
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
# A group's prompt runs once (teachers.response_hidden): the same numbers as per row
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
    shared = []
    monkeypatch_module.setattr(teachers, "_shareable_cache",
                               _recording(_SHAREABLE_CACHE, shared))
    a, ga = _scored(monkeypatch_module, False, fn, model, rows)
    b, gb = _scored(monkeypatch_module, True, fn, model, rows)
    assert shared == ([True] if G > 1 else [])  # it ran where rows repeat, and only there
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * max(1.0, y.abs().max().item()))


_SHAREABLE_CACHE = teachers._shareable_cache


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
    assert teachers._shareable_cache(model) is None
    torch.testing.assert_close(teachers.response_logits(model, *rows), ref)
    with torch.no_grad():  # nothing is recomputed without a backward: shared again
        assert teachers._shareable_cache(model) is not None
        shared = teachers.response_logits(model, *rows)
    torch.testing.assert_close(shared, ref, rtol=1e-5, atol=1e-5)
