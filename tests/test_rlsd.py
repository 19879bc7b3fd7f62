"""rlsd.py: the invariants of spec section 1.8, hand cases, and the reduction to GRPO."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import grpo
from conftest import randn
from rlsd import lambda_schedule, rlsd_loss, rlsd_token_advantages

seeds = st.integers(0, 10_000)
lams = st.floats(0.0, 1.0)
eps_ws = st.floats(0.0, 0.9)


def _inputs(seed, n=5, t=6):
    adv = randn(seed, n, scale=2.0)
    adv[0] = 0.0  # always include a zero-advantage rollout
    return adv, randn(seed + 1, n, t, scale=2.0), randn(seed + 2, n, t, scale=2.0)


def test_hand_case():
    adv = torch.tensor([1.0, -2.0])
    teacher = torch.tensor([[math.log(1.1)], [math.log(2.0)]])
    student = torch.zeros(2, 1)
    out = rlsd_token_advantages(adv, teacher, student, lam=0.5, eps_w=0.2)
    # A>0: w = 1.1 (inside the clip) -> 1 + 0.5 * 0.1 = 1.05
    # A<0: w = exp(-log 2) = 0.5 -> clipped to 0.8 -> 1 + 0.5 * (-0.2) = 0.9 -> -1.8
    torch.testing.assert_close(out, torch.tensor([[1.05], [-1.8]]))


@given(seed=seeds, lam=lams, eps_w=eps_ws)
def test_sign_preserved_and_zero_where_masked(seed, lam, eps_w):
    adv, t, s = _inputs(seed)
    mask = randn(seed + 3, 5, 6) > 0
    out = rlsd_token_advantages(adv, t, s, lam=lam, eps_w=eps_w, mask=mask)
    sign = torch.sign(adv)[:, None].expand_as(out)
    assert torch.equal(torch.sign(out)[mask], sign[mask])
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(out[0], torch.zeros(6))  # A = 0 row


@given(seed=seeds, lam=lams, eps_w=eps_ws)
def test_weight_bounds(seed, lam, eps_w):
    adv, t, s = _inputs(seed)
    nz = adv != 0
    ratio = rlsd_token_advantages(adv, t, s, lam=lam, eps_w=eps_w)[nz] / adv[nz, None]
    assert (ratio > 0).all()
    assert (ratio >= 1 - lam * eps_w - 1e-6).all() and (ratio <= 1 + lam * eps_w + 1e-6).all()


@given(seed=seeds, lam=lams, eps_w=eps_ws)
def test_reductions_to_grpo_are_bitwise(seed, lam, eps_w):
    adv, t, s = _inputs(seed)
    expect = adv[:, None].expand(5, 6)
    assert torch.equal(rlsd_token_advantages(adv, t, s, lam=0.0, eps_w=eps_w), expect)
    assert torch.equal(rlsd_token_advantages(adv, t, s, lam=lam, eps_w=0.0), expect)
    assert torch.equal(rlsd_token_advantages(adv, s, s, lam=lam, eps_w=eps_w), expect)


@given(seed=seeds, lam=lams, eps_w=eps_ws)
def test_direction_awareness_and_symmetry(seed, lam, eps_w):
    delta = torch.sort(randn(seed, 1, 12, scale=2.0)).values  # increasing delta along T
    zero = torch.zeros(1, 12)
    pos = rlsd_token_advantages(torch.tensor([1.0]), delta, zero, lam=lam, eps_w=eps_w)
    neg = rlsd_token_advantages(torch.tensor([-1.0]), delta, zero, lam=lam, eps_w=eps_w)
    assert (pos.diff() >= 0).all()            # A > 0: more teacher support, more credit
    assert (neg.abs().diff() <= 0).all()      # A < 0: more teacher support, less blame
    mirrored = rlsd_token_advantages(torch.tensor([-1.0]), -delta, zero, lam=lam, eps_w=eps_w)
    torch.testing.assert_close(pos, -mirrored)  # w(A>0, d) == w(A<0, -d)


@given(seed=seeds, lam=lams, c=st.floats(0.01, 100.0))
def test_scale_equivariance(seed, lam, c):
    adv, t, s = _inputs(seed)
    torch.testing.assert_close(rlsd_token_advantages(c * adv, t, s, lam=lam),
                               c * rlsd_token_advantages(adv, t, s, lam=lam))


@given(seed=seeds)
def test_telescoping_identity_without_clip(seed):
    """lam = 1, no clip, A > 0: sum_t log w_t = sum_t delta_t = log P_T(y) - log P_S(y)."""
    _, t, s = _inputs(seed, n=3, t=4)
    t, s = t * 0.1, s * 0.1  # keep exp(delta) inside the (huge) clip range
    out = rlsd_token_advantages(torch.ones(3), t, s, lam=1.0, eps_w=1e6)
    torch.testing.assert_close(out.log().sum(1), (t - s).sum(1), atol=1e-5, rtol=1e-5)


@given(seed=seeds, lam=lams)
def test_stop_gradient(seed, lam):
    adv, t, s = _inputs(seed)
    t.requires_grad_(), s.requires_grad_()
    out = rlsd_token_advantages(adv, t, s, lam=lam)
    assert not out.requires_grad  # no path from the weight back to either log-prob
    logp = s.detach().clone().requires_grad_()
    mask = torch.ones(5, 6)
    loss, _ = rlsd_loss(logp, logp.detach(), adv, t, mask, lam=lam)
    loss.backward()
    assert t.grad is None
    # the gradient is the policy gradient with the detached token advantages, nothing more
    logp2 = s.detach().clone().requires_grad_()
    ref = grpo.aggregate(grpo.policy_loss(logp2, logp2.detach(), out)[0], mask)
    ref.backward()
    torch.testing.assert_close(logp.grad, logp2.grad)


@given(seed=seeds, lam=lams)
def test_rlsd_loss_is_grpo_when_lambda_zero_or_teacher_is_student(seed, lam):
    adv, t, s = _inputs(seed)
    mask = randn(seed + 3, 5, 6) > -0.5
    old = s + 0.1 * randn(seed + 4, 5, 6)  # off-policy, so the PPO clip is exercised too
    grads = []
    for teacher, la in [(t, 0.0), (s, lam), (None, None)]:
        logp = s.clone().requires_grad_()
        if teacher is None:   # plain GRPO
            loss = grpo.aggregate(grpo.policy_loss(logp, old, adv)[0], mask)
        else:
            loss, _ = rlsd_loss(logp, old, adv, teacher, mask, lam=la)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    for loss, grad in grads[:2]:
        assert torch.equal(loss, grads[2][0]) and torch.equal(grad, grads[2][1])


def test_equal_rewards_give_no_gradient_even_with_teacher_signal():
    adv = grpo.group_advantages(torch.ones(4), 4)
    logp = torch.randn(4, 3, requires_grad=True)
    loss, _ = rlsd_loss(logp, logp.detach(), adv, torch.randn(4, 3), torch.ones(4, 3), lam=0.5)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 3))


def test_rlsd_metrics():
    adv = torch.tensor([1.0, -1.0])
    t = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]])
    logp = torch.zeros(2, 2, requires_grad=True)
    _, m = rlsd_loss(logp, logp.detach(), adv, t, torch.ones(2, 2), lam=0.5)
    assert m["rlsd_weight_clip_frac"].item() == pytest.approx(0.25)  # one of four is clipped
    assert "rlsd_lambda" not in m  # the schedule is the trainer's (train.py logs it)
    assert m["ratio_mean"].item() == pytest.approx(1.0)  # on-policy: rho == 1


@given(step=st.integers(1, 500), lam0=st.floats(0.0, 1.0), warmup=st.integers(0, 30),
       decay=st.integers(0, 100))
def test_lambda_schedule_properties(step, lam0, warmup, decay):
    lam = lambda_schedule(step, lam0=lam0, warmup=warmup, decay=decay)
    assert 0.0 <= lam <= lam0 + 1e-12
    if step >= warmup:
        assert lambda_schedule(step + 1, lam0=lam0, warmup=warmup, decay=decay) <= lam
    if decay > 0 and step >= warmup + decay:
        assert lam == 0.0
    if decay <= 0 and step >= warmup:
        assert lam == lam0


def test_lambda_schedule_hand_values():
    assert lambda_schedule(1) == pytest.approx(0.5 * 49 / 50)
    assert lambda_schedule(25) == pytest.approx(0.25)
    assert lambda_schedule(50) == 0.0 and lambda_schedule(60, decay=60) == 0.0
    assert lambda_schedule(5, warmup=10) == pytest.approx(0.25)
    assert lambda_schedule(10, warmup=10, decay=0) == 0.5
