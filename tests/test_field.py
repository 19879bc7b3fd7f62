"""What the field added after the seed papers: contrastive self-distillation (CSD), Semi-OPD's
cached rollouts (--rollout-refresh), equivalent end tokens (--eos-ids), several OPD teachers,
and the learning-signal metrics. The math against float64 references, the trainer end to end."""
import json
import os

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file

import distill
import train
from engine import batch as rollouts, teachers
from test_train import TINY, _train_rows, run


def _logits(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


# ----------------------------------------------------------------------------------------
# CSD: the two forms, their gradients, the routing
# ----------------------------------------------------------------------------------------

def _kl(ls, lt):  # float64 reference KL(S || T) over the last dim
    return (ls.exp() * (ls - lt)).sum(-1)


@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_csd_full_form_is_the_weighted_difference_of_two_kls(seed, a, r):
    s, p, n = _logits(seed, 2, 3, 7), _logits(seed + 1, 2, 3, 7), _logits(seed + 2, 2, 3, 7)
    got = distill.csd_divergence(s, p, n, attract=a, repel=r)
    ls, lp, ln = (torch.log_softmax(x, -1) for x in (s, p, n))
    torch.testing.assert_close(got, a * _kl(ls, lp) - r * _kl(ls, ln), rtol=1e-12, atol=1e-12)


def _grads(s, p, n, a, r):
    """(full form's gradient, the sampled-token form's gradient in expectation under S)."""
    x = s.clone().requires_grad_(True)
    distill.csd_divergence(x, p, n, attract=a, repel=r).sum().backward()
    full = x.grad
    y = s.clone().requires_grad_(True)
    ls = torch.log_softmax(y, -1)
    adv = distill.csd_advantages(ls, torch.log_softmax(p, -1), torch.log_softmax(n, -1),
                                 attract=a, repel=r)
    # E_{y ~ S}[-A(y) grad log S(y)] = sum_y S(y) (-A(y)) grad log S(y), S and A held fixed
    (ls.exp().detach() * -adv * ls).sum().backward()
    return full, y.grad


@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_csd_sampled_form_equals_the_full_gradient_in_expectation(seed, a, r):
    s, p, n = _logits(seed, 4, 9), _logits(seed + 1, 4, 9), _logits(seed + 2, 4, 9)
    full, sampled = _grads(s, p, n, a, r)
    torch.testing.assert_close(sampled, full, rtol=1e-10, atol=1e-12)


@given(st.integers(0, 10_000))
def test_csd_gradient_flips_when_the_teachers_swap_and_is_zero_when_they_agree(seed):
    s, p, n = _logits(seed, 3, 6), _logits(seed + 1, 3, 6), _logits(seed + 2, 3, 6)
    forward, _ = _grads(s, p, n, 0.5, 0.5)
    swapped, _ = _grads(s, n, p, 0.5, 0.5)
    torch.testing.assert_close(swapped, -forward, rtol=1e-12, atol=1e-14)
    assert forward.abs().max() > 1e-6  # different teachers: a gradient that can flip
    same, _ = _grads(s, p, p, 0.5, 0.5)
    assert same.abs().max() < 1e-14
    assert torch.equal(distill.csd_advantages(s, p, p), torch.zeros_like(s))


def test_csd_top_k_support_is_the_students_for_both_teachers():
    s, p, n = _logits(0, 2, 12), _logits(1, 2, 12), _logits(2, 2, 12)
    got = distill.csd_divergence(s, p, n, top_k=4)
    ls, lp = distill.topk_with_tail(s, p, 4)
    _, ln = distill.topk_with_tail(s, n, 4)
    torch.testing.assert_close(got, 0.5 * _kl(ls, lp) - 0.5 * _kl(ls, ln))


def test_csd_route_picks_the_first_correct_and_the_first_wrong_sibling():
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    pos, neg = distill.csd_route(r, 4)
    assert pos.tolist() == [3, 0, 0, 0, -1, -1, -1, -1, 9, 8, 8, 8]
    assert neg.tolist() == [1, 2, 1, 1, 5, 4, 4, 4, -1, -1, -1, -1]


# ----------------------------------------------------------------------------------------
# Equivalent end tokens
# ----------------------------------------------------------------------------------------

ENDS = (4, 5)


@given(st.integers(0, 10_000), st.floats(0.01, 0.99), st.floats(0.0, 1.0))
def test_merged_ends_divergence_is_the_merged_distributions_and_ignores_the_split(seed, share,
                                                                                  beta):
    s, t = _logits(seed, 3, 6), _logits(seed + 1, 3, 6)
    p_t = torch.softmax(t, -1)
    end = p_t[..., 4] + p_t[..., 5]  # the teacher's stop mass, split `share` : 1 - share
    split = p_t.clone()
    split[..., 4], split[..., 5] = share * end, (1 - share) * end
    t2 = split.log()
    merged = distill.distill_per_token(distill.merge_equivalent_ends(s, ENDS),
                                       distill.merge_equivalent_ends(t2, ENDS), beta=beta)
    again = distill.distill_per_token(distill.merge_equivalent_ends(s, ENDS),
                                      distill.merge_equivalent_ends(t, ENDS), beta=beta)
    torch.testing.assert_close(merged, again, rtol=1e-10, atol=1e-12)  # invariant to the split

    def bucket(z):  # the merged distribution by hand: ends summed into one entry
        p = torch.softmax(z, -1)
        return torch.cat([p[..., :4], p[..., 4:6].sum(-1, keepdim=True)], -1).log()
    ref = distill.divergence(bucket(s), bucket(t2), beta=beta)
    torch.testing.assert_close(merged, ref, rtol=1e-10, atol=1e-12)


def test_merged_end_token_logprob_is_the_stop_mass():
    z = _logits(3, 2, 5, 6)
    tokens = torch.tensor([[5, 4, 0, 1, 5], [2, 3, 4, 5, 0]])
    import grpo
    got = grpo.token_logprobs(distill.merge_equivalent_ends(z, ENDS),
                              distill.merge_end_tokens(tokens, ENDS))
    p = torch.softmax(z, -1)
    stop = (p[..., 4] + p[..., 5]).log()
    want = torch.where(torch.isin(tokens, torch.tensor(ENDS)), stop,
                       p.log().gather(-1, tokens[..., None]).squeeze(-1))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    assert distill.merge_equivalent_ends(z, (4,)) is z  # one end id: nothing to merge


def test_eos_ids_change_opds_divergence_and_nothing_else(tmp_path, cache):
    """The toy has one end id; naming a second (<unk>) merges the two in the teacher's and the
    student's log-probs: the rollouts and rewards are the same, the KL is not."""
    other = _tiny_teacher(tmp_path / "teacher", 3)  # not the student: a KL that is not 0
    args = ("--algo", "opd", "--teacher", other, "--steps", "1", "--reward", "signal_reward:parity")
    _, one = run(tmp_path / "a", cache, *args, "--eos-ids", "1")
    _, two = run(tmp_path / "b", cache, *args, "--eos-ids", "1,2")
    a, b = one[-1], two[-1]
    for k in ("reward_mean", "response_len_mean", "truncated_frac", "tokens"):
        assert a[k] == b[k], k
    assert a["opd_reverse_kl"] != b["opd_reverse_kl"]


# ----------------------------------------------------------------------------------------
# Semi-OPD: --rollout-refresh
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("refresh", ["0", "2"])
def test_resume_keeps_the_cached_rollouts_exactly(tmp_path, cache, refresh):
    extra = ["--algo", "opsd", "--rollout-refresh", refresh, "--lr-schedule", "constant",
             "--group-size", "1", "--prompts-per-step", "4"]
    full, rows_full = run(tmp_path / "a", cache, *extra, "--steps", "4")
    part = str(tmp_path / "b")
    train.main(TINY + ["--cache-dir", cache, "--out", part, *extra])  # 2 steps, a checkpoint
    train.main(TINY + ["--cache-dir", cache, "--out", part, *extra, "--steps", "4", "--resume"])
    with open(os.path.join(part, "metrics.jsonl")) as f:
        assert _train_rows([json.loads(line) for line in f]) == _train_rows(rows_full)
    a = load_file(os.path.join(full, "checkpoint-000004", "model.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refresh_zero_samples_each_prompt_once(tmp_path, cache, monkeypatch):
    """Two prompts, two a step: every step meets both again; with --rollout-refresh 0 they
    are sampled once (from the initial student), with 1 at every step. (OPD: OPSD's paper
    template does not fit the toy model's 256-token context, and the run says so.)"""
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n"
                         for q, a in (("1+2", "3"), ("5-1", "4"))))
    teacher = _tiny_teacher(tmp_path / "teacher", 3)
    calls = []
    real = rollouts.sample

    def spy(model, tok, examples, **kw):
        calls.append(len(examples))
        return real(model, tok, examples, **kw)

    monkeypatch.setattr(rollouts, "sample", spy)
    common = ("--algo", "opd", "--teacher", teacher, "--data", str(f), "--group-size", "2",
              "--prompts-per-step", "2", "--steps", "3")
    run(tmp_path / "a", cache, *common, "--rollout-refresh", "0")
    assert calls == [4]
    calls.clear()
    run(tmp_path / "b", cache, *common)
    assert calls == [4, 4, 4]


# ----------------------------------------------------------------------------------------
# Several teachers, and the learning-signal metrics
# ----------------------------------------------------------------------------------------

def _tiny_teacher(path, seed):
    from engine.toy.models import build_toy_model, build_toy_tokenizer
    tok = build_toy_tokenizer()
    build_toy_model(tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_each_row_is_scored_by_its_own_teacher(tmp_path, cache, monkeypatch):
    a, b = _tiny_teacher(tmp_path / "ta", 1), _tiny_teacher(tmp_path / "tb", 2)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+1", "answer": str(i + 1),
                                     "who": "B" if i % 2 else ""}) + "\n" for i in range(8)))
    scored = []
    real = teachers.sampled_token_logprobs

    def spy(model, *args, **kw):
        scored.append((getattr(model, "name_or_path", ""), len(args[0])))
        return real(model, *args, **kw)

    monkeypatch.setattr(teachers, "sampled_token_logprobs", spy)
    run(tmp_path / "r", cache, "--algo", "opd", "--teacher", f"A={a}", "--teacher", f"B={b}",
        "--teacher-key", "who", "--data", str(f), "--steps", "1", "--group-size", "2",
        "--prompts-per-step", "8")
    by = {}
    for name, n in scored:
        by[name] = by.get(name, 0) + n
    assert by == {a: 8, b: 8}  # 8 prompts x 2 rollouts, half of them named B
    f.write_text(json.dumps({"prompt": "1+1", "answer": "2", "who": "C"}) + "\n")
    with pytest.raises(SystemExit, match=r"rows.jsonl:1: who 'C' is not a --teacher name"):
        train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "x"), "--algo", "opd",
                           "--teacher", f"A={a}", "--teacher", f"B={b}", "--teacher-key", "who",
                           "--data", str(f)])


def test_grad_norm_and_displacement_are_logged_every_step(tmp_path, cache):
    _, rows = run(tmp_path, cache, "--algo", "grpo", "--steps", "2",
                  "--reward", "signal_reward:parity")
    steps = [r for r in rows if r["step"] > 0]
    assert all(r["grad_norm"] >= 0 and r["param_displacement"] > 0 for r in steps)
    assert steps[1]["param_displacement"] > steps[0]["param_displacement"]
