"""distill.py: divergence conventions, top-k, SDPO, SRPO and PTD-PO invariants and gradients."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import distill as D
import grpo
from conftest import randn

seeds = st.integers(0, 10_000)
betas = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])


def _kl(lp, lq):
    """Independent float64 KL(p || q) from log-probs."""
    lp, lq = lp.double(), lq.double()
    return (lp.exp() * (lp - lq)).sum(-1)


def _lsm(seed, *shape, scale=2.0):
    return torch.log_softmax(randn(seed, *shape, scale=scale, dtype=torch.float64), -1)


# ---- divergence ------------------------------------------------------------------------------

@given(seed=seeds)
def test_divergence_conventions(seed):
    ls, lt = _lsm(seed, 4, 9), _lsm(seed + 1, 4, 9)
    torch.testing.assert_close(D.divergence(ls, lt, beta=0.0).double(), _kl(lt, ls))
    torch.testing.assert_close(D.divergence(ls, lt, beta=1.0).double(), _kl(ls, lt))
    lm = torch.log(0.3 * lt.exp() + 0.7 * ls.exp())
    torch.testing.assert_close(D.divergence(ls, lt, beta=0.3).double(),
                               0.3 * _kl(lt, lm) + 0.7 * _kl(ls, lm), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(D.divergence(ls, lt, beta=0.5), D.divergence(lt, ls, beta=0.5))


@given(seed=seeds, beta=betas)
def test_divergence_nonnegative_zero_iff_equal(seed, beta):
    ls, lt = _lsm(seed, 3, 7), _lsm(seed + 1, 3, 7)
    d = D.divergence(ls, lt, beta=beta)
    assert (d >= -1e-6).all()
    assert (D.divergence(ls, ls, beta=beta).abs() <= 1e-6).all()
    if 0 < beta < 1:  # generalised JSD is bounded by the binary entropy H(beta) <= ln 2
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (d <= h + 1e-6).all()
    # strictly positive when the distributions differ visibly
    assert (d[(ls.exp() - lt.exp()).abs().sum(-1) > 0.1] > 0).all()


def test_divergence_jsd_bound_attained_by_disjoint_supports():
    ls = torch.log(torch.tensor([1.0, 0.0]))
    lt = torch.log(torch.tensor([0.0, 1.0]))
    assert D.divergence(ls, lt, beta=0.5).item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.isfinite(D.divergence(ls, lt, beta=1.0))


@given(seed=seeds)
def test_divergence_endpoints_are_the_limits_of_the_mixture(seed):
    """D_beta / beta -> KL(T||S) as beta -> 0 and D_beta / (1-beta) -> KL(S||T) as beta -> 1."""
    ls, lt = _lsm(seed, 2, 6, scale=1.0), _lsm(seed + 1, 2, 6, scale=1.0)
    b = 1e-4
    torch.testing.assert_close(D.divergence(ls, lt, beta=b) / b, D.divergence(ls, lt, beta=0.0),
                               atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(D.divergence(ls, lt, beta=1 - b) / b,
                               D.divergence(ls, lt, beta=1.0), atol=2e-3, rtol=2e-3)


@given(seed=seeds, beta=betas, tau=st.floats(0.001, 0.5))
def test_token_clip(seed, beta, tau):
    ls, lt = _lsm(seed, 3, 8), _lsm(seed + 1, 3, 8)
    clipped = D.divergence(ls, lt, beta=beta, token_clip=tau)
    assert (clipped <= D.divergence(ls, lt, beta=beta) + 1e-6).all()
    assert (clipped <= 8 * tau + 1e-6).all()  # each of the 8 summands is <= tau
    assert torch.equal(D.divergence(ls, lt, beta=beta, token_clip=math.inf),
                       D.divergence(ls, lt, beta=beta))


def test_token_clip_hand_case_can_be_negative():
    lt = torch.log(torch.tensor([0.9, 0.1]))
    ls = torch.log(torch.tensor([0.1, 0.9]))
    # forward KL summands: 0.9 ln 9 = 1.978 and 0.1 ln(1/9) = -0.220; clip at 0.05
    assert D.divergence(ls, lt, beta=0.0, token_clip=0.05).item() == pytest.approx(
        0.05 + 0.1 * math.log(1 / 9), abs=1e-6)
    lt2, ls2 = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.05, 0.95]))
    assert D.divergence(ls2, lt2, beta=0.0, token_clip=0.05).item() < 0


@given(seed=seeds)
def test_reverse_kl_gradient_identity_sdpo_prop_2_1(seed):
    """grad_z KL(pi||q) = sum_v grad log pi(v) * pi(v) * log(pi(v)/q(v))  (SDPO Prop. 2.1)."""
    z = randn(seed, 3, 10, dtype=torch.float64).requires_grad_()
    lq = _lsm(seed + 1, 3, 10)
    D.distill_per_token(z, lq, beta=1.0).sum().backward()
    pi = torch.softmax(z.detach(), -1)
    a = pi.log() - lq
    # d log pi_v / d z_j = 1[v=j] - pi_j  =>  sum_v (1[v=j] - pi_j) pi_v a_v
    expect = pi * a - pi * (pi * a).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, expect, atol=1e-6, rtol=1e-5)


# ---- top-k with tail -------------------------------------------------------------------------

@given(seed=seeds, k=st.integers(1, 12), add_tail=st.booleans())
def test_topk_buckets_are_distributions_on_the_student_support(seed, k, add_tail):
    s, t = randn(seed, 2, 3, 12, scale=2.0), randn(seed + 1, 2, 3, 12, scale=2.0)
    ls, lt = D.topk_with_tail(s, t, k, add_tail=add_tail)
    assert ls.shape[-1] == k + add_tail
    torch.testing.assert_close(ls.exp().sum(-1), torch.ones(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(lt.exp().sum(-1), torch.ones(2, 3), atol=1e-6, rtol=0)
    if add_tail:  # the first k entries are the full-vocabulary log-probs at the student's top-k
        idx = s.topk(k, -1).indices
        torch.testing.assert_close(ls[..., :k], torch.log_softmax(s, -1).gather(-1, idx))
        torch.testing.assert_close(lt[..., :k], torch.log_softmax(t, -1).gather(-1, idx))


def test_topk_teacher_support_option():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    _, lt = D.topk_with_tail(s, t, 1, support="teacher")
    assert lt[0, 0].item() == pytest.approx(torch.log_softmax(t, -1)[0, 3].item())


@given(seed=seeds, beta=betas)
def test_topk_with_k_equal_v_is_full_vocabulary(seed, beta):
    s, t = randn(seed, 2, 3, 9), randn(seed + 1, 2, 3, 9)
    full = D.distill_per_token(s, t, beta=beta)
    for add_tail in (True, False):
        torch.testing.assert_close(D.distill_per_token(s, t, beta=beta, top_k=9, add_tail=add_tail),
                                   full, atol=1e-5, rtol=1e-4)


@given(seed=seeds, temp=st.sampled_from([0.5, 1.1, 2.0]), beta=betas)
def test_temperature_is_logit_scaling(seed, temp, beta):
    s, t = randn(seed, 2, 4, 7), randn(seed + 1, 2, 4, 7)
    torch.testing.assert_close(D.distill_per_token(s, t, beta=beta, temperature=temp),
                               D.distill_per_token(s / temp, t / temp, beta=beta))


def test_teacher_gets_no_gradient():
    s, t = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8, requires_grad=True)
    (D.distill_per_token(s, t, beta=0.5, top_k=4).sum()
     + D.ptd_topk_jsd(s, t, k=3).sum()).backward()
    assert t.grad is None and s.grad is not None


# ---- OPD, SDPO helpers -------------------------------------------------------------------------

def test_opd_advantages():
    s = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    t = torch.tensor([[-0.5, -3.0]])
    a = D.opd_advantages(s, t)
    torch.testing.assert_close(a, torch.tensor([[0.5, -1.0]]))
    assert not a.requires_grad
    assert torch.equal(D.opd_advantages(s, s.detach()), torch.zeros(1, 2))


@given(seed=seeds)
def test_sdpo_is_weight_is_detached_and_capped(seed):
    s, t = randn(seed, 2, 3, 10).requires_grad_(), randn(seed + 1, 2, 3, 10)
    logp = randn(seed + 2, 2, 3, scale=2.0).requires_grad_()
    old = torch.zeros(2, 3)
    loss = D.sdpo_per_token(s, t, logp, old, top_k=5)
    div = D.distill_per_token(s, t, beta=0.5, top_k=5)
    ratio = (loss / div).detach()
    torch.testing.assert_close(ratio, logp.detach().exp().clamp(max=2.0), atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    assert logp.grad is None  # the IS weight is data
    on_policy = D.sdpo_per_token(s, t, logp, logp.detach(), top_k=5)
    torch.testing.assert_close(on_policy, div)


@given(seed=seeds, rate=st.floats(0.0, 1.0))
def test_trust_region_teacher_is_geometric_mixture(seed, rate):
    ref, cur = randn(seed, 2, 6, dtype=torch.float64), randn(seed + 1, 2, 6, dtype=torch.float64)
    mixed = torch.log_softmax(D.trust_region_logits(ref, cur, rate).double(), -1)
    geo = (1 - rate) * torch.log_softmax(ref, -1) + rate * torch.log_softmax(cur, -1)
    torch.testing.assert_close(mixed, torch.log_softmax(geo, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(D.trust_region_logits(ref, cur, 0.0), ref.float())
    torch.testing.assert_close(D.trust_region_logits(ref, cur, 1.0), cur.float())


@given(seed=seeds, rate=st.floats(0.0, 1.0))
def test_ema_update(seed, rate):
    teacher = [randn(seed, 3, 2), randn(seed + 1, 4)]
    student = [randn(seed + 2, 3, 2), randn(seed + 3, 4)]
    old = [t.clone() for t in teacher]
    D.ema_update(teacher, student, rate)
    for t, o, s in zip(teacher, old, student):
        torch.testing.assert_close(t, (1 - rate) * o + rate * s)
    D.ema_update(teacher, student, 0.0)
    frozen = [t.clone() for t in teacher]
    D.ema_update(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher, frozen))
    D.ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher, student))


# ---- SRPO ------------------------------------------------------------------------------------

def test_srpo_route_table_7():
    # group 0: one right (index 1); group 1: all wrong; group 2: all right; group 3: two right
    r = torch.tensor([0, 1, 0, 0,  0, 0, 0, 0,  1, 1, 1, 1,  1, 0, 1, 0.4])
    to_sdpo, sib = D.srpo_route(r, 4)
    assert to_sdpo.tolist() == [True, False, True, True] + [False] * 8 + [False, True, False, True]
    # the only right rollout has no teacher; wrong ones use it; all-wrong group has none
    assert sib.tolist() == [1, -1, 1, 1] + [-1] * 4 + [9, 8, 8, 8] + [14, 12, 12, 12]


@given(rewards=st.lists(st.sampled_from([0.0, 0.3, 0.5, 1.0]), min_size=12, max_size=12),
       g=st.sampled_from([2, 3, 4, 6]))
def test_srpo_route_properties(rewards, g):
    r = torch.tensor(rewards)
    to_sdpo, sib = D.srpo_route(r, g)
    correct = r >= 0.5
    for i in range(12):
        lo = i // g * g
        others = [j for j in range(lo, lo + g) if j != i and correct[j]]
        assert sib[i].item() == (others[0] if others else -1)
        assert to_sdpo[i].item() == (not correct[i] and bool(others))
    # the teacher's availability never depends on the rollout's own reward
    flipped = r.clone()
    flipped[0] = 1.0 - (r[0] >= 0.5).float()
    assert torch.equal(D.srpo_route(flipped, g)[1][0], sib[0])


def test_srpo_grpo_branch_advantages_nonnegative():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    to_sdpo, _ = D.srpo_route(r, 4)
    adv = grpo.group_advantages(r, 4, scale="none")
    assert (adv[~to_sdpo] >= 0).all()


@given(seed=seeds, beta=st.floats(0.0, 5.0), shift=st.floats(-3.0, 3.0))
def test_entropy_weights(seed, beta, shift):
    h = randn(seed, 3, 5).abs() * 3
    mask = randn(seed + 1, 3, 5) > -0.3
    mask[0, 0] = True
    w = D.entropy_weights(h, mask, beta=beta)
    assert (w[mask] > 0).all() and torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    assert w[mask].mean().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(D.entropy_weights(h + shift, mask, beta=beta), w)
    if beta > 0:  # strictly decreasing in H
        order = torch.argsort(h[mask])
        assert (w[mask][order].diff() <= 0).all()
    assert torch.equal(D.entropy_weights(h, mask, beta=0.0), mask.float())


def test_entropy_weights_empty_mask_is_zero_not_nan():
    w = D.entropy_weights(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(w, torch.zeros(2, 3))


def _srpo_batch(seed):
    logp = randn(seed, 4, 5).requires_grad_()
    s_logits = randn(seed + 1, 4, 5, 8).requires_grad_()
    t_logits = randn(seed + 2, 4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 3:] = False
    return logp, s_logits, t_logits, mask


def test_srpo_without_sdpo_tokens_is_grpo_token_mean():
    logp, s, t, mask = _srpo_batch(0)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    pg, _ = grpo.policy_loss(logp, logp.detach(), adv)
    sd = D.sdpo_per_token(s, t, logp, logp.detach(), top_k=4)
    none = torch.zeros(4, dtype=torch.bool)
    w = D.entropy_weights(grpo.entropy(t), mask & none[:, None])
    out = D.srpo_loss(pg, sd, w, none, mask)
    assert torch.equal(out, grpo.aggregate(pg, mask))
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_srpo_only_sdpo_and_nan_in_unused_branch():
    logp, s, t, mask = _srpo_batch(1)
    sd = D.sdpo_per_token(s, t, logp, logp.detach(), top_k=4)
    all_rows = torch.ones(4, dtype=torch.bool)
    w = D.entropy_weights(grpo.entropy(t), mask)
    nan_pg = torch.full((4, 5), float("nan"))
    out = D.srpo_loss(nan_pg, sd, w, all_rows, mask)
    torch.testing.assert_close(out, (w * sd)[mask].sum() / mask.sum())
    out.backward()
    assert torch.isfinite(s.grad).all()


@given(seed=seeds, cut=st.integers(1, 3))
def test_srpo_gradient_independent_of_micro_batch_split(seed, cut):
    logp, s, t, mask = _srpo_batch(seed)
    adv = randn(seed + 5, 4)
    to_sdpo = torch.tensor([True, False, True, False])
    sd_mask = mask & to_sdpo[:, None]
    h = grpo.entropy(t)
    raw_mean = torch.exp(-h.double())[sd_mask].mean()  # the trainer's global normalizer
    n_tok = mask.sum()

    def loss(rows):
        pg, _ = grpo.policy_loss(logp[rows], logp[rows].detach(), adv[rows])
        sd = D.sdpo_per_token(s[rows], t[rows], logp[rows], logp[rows].detach(), top_k=4)
        w = D.entropy_weights(h[rows], sd_mask[rows], normalizer=raw_mean)
        return D.srpo_loss(pg, sd, w, to_sdpo[rows], mask[rows], normalizer=n_tok)

    g_full = torch.autograd.grad(loss(slice(0, 4)), [logp, s])
    g_split = torch.autograd.grad(loss(slice(0, cut)) + loss(slice(cut, 4)), [logp, s])
    for a, b in zip(g_full, g_split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- PTD-PO ------------------------------------------------------------------------------------

def test_ptd_mask_cases():
    acc = torch.tensor([1.0, 1, 1, 1,  0, 0, 0, 0,  1, 0, 0.5, 1])
    hint = torch.ones(12, dtype=torch.bool)
    hint[6] = False
    m = D.ptd_mask(acc, 4, hint)
    assert m.tolist() == [False] * 4 + [True, True, False, True] + [False, True, True, False]
    assert not D.ptd_mask(acc, 4, hint, tau=0.0).any()
    group = D.ptd_mask(acc, 4, hint, all_trajectories=True)
    assert group.tolist() == [False] * 4 + [True, True, False, True] + [True] * 4
    # tau = 0.5: the group with half fully-correct rollouts is no longer active
    assert not D.ptd_mask(acc, 4, hint, tau=0.5)[8:].any()
    assert not D.ptd_mask(acc, 4, torch.zeros(12, dtype=torch.bool)).any()


def _ptd_reference(s_logits, t_logits, k, miss_vocab):
    """The official O(k^2) equality-match formulation, float64, written independently."""
    s_lp_full = torch.log_softmax(s_logits.double(), -1)
    s_idx = s_logits.topk(k, -1).indices
    s_p = s_lp_full.gather(-1, s_idx).exp()
    t_lp_full = torch.log_softmax(t_logits.double(), -1)
    t_top, t_idx = t_lp_full.topk(k, -1)
    match = s_idx[..., :, None] == t_idx[..., None, :]
    hit_lp = (match.double() * t_top[..., None, :]).sum(-1)
    tail_mass = (1 - t_top.exp().sum(-1, keepdim=True)).clamp(min=1e-10)
    t_p = torch.where(match.any(-1), hit_lp, tail_mass.log() - math.log(miss_vocab - k)).exp()
    tail_s = (1 - s_p.sum(-1)).clamp(min=1e-8)
    tail_t = (1 - t_p.sum(-1)).clamp(min=1e-8)
    m, m_tail = 0.5 * (s_p + t_p), 0.5 * (tail_s + tail_t)
    kl_s = (s_p * (s_p / m).log()).sum(-1) + tail_s * (tail_s / m_tail).log()
    kl_t = (t_p * (t_p / m).log()).sum(-1) + tail_t * (tail_t / m_tail).log()
    return 0.5 * (kl_s + kl_t)


@given(seed=seeds, k=st.integers(1, 15), miss=st.sampled_from([None, 1000]))
def test_ptd_topk_jsd_matches_official_formulation(seed, k, miss):
    s, t = randn(seed, 2, 3, 16, scale=2.0), randn(seed + 1, 2, 3, 16, scale=2.0)
    ours = D.ptd_topk_jsd(s, t, k=k, miss_vocab=miss)
    ref = _ptd_reference(s, t, k, 16 if miss is None else miss)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)
    assert (ours >= -1e-6).all() and (ours <= math.log(2) + 1e-6).all()
    assert (D.ptd_topk_jsd(s, s, k=k, miss_vocab=miss).abs() <= 1e-6).all()


@given(seed=seeds, k=st.integers(1, 7))
def test_ptd_gradient_is_the_stop_gradient_surrogate(seed, k):
    """Autograd == finite differences of the surrogate in which sg(p_s), sg(tail_s) are frozen."""
    s = randn(seed, 1, 1, 8, scale=1.5, dtype=torch.float64).requires_grad_()
    t = randn(seed + 1, 1, 1, 8, scale=1.5, dtype=torch.float64)
    D.ptd_topk_jsd(s, t, k=k).sum().backward()
    with torch.no_grad():
        idx = s.topk(k, -1).indices
        p0 = torch.softmax(s, -1).gather(-1, idx)
        tail0 = (1 - p0.sum(-1)).clamp(min=1e-8)

    def surrogate(z):  # teacher side and the frozen weights are constants
        lp = torch.log_softmax(z, -1).gather(-1, idx)
        p = lp.exp()
        t_full = torch.log_softmax(t, -1)
        t_top = t_full.topk(k, -1).values
        hit = t_full.gather(-1, idx) >= t_top[..., -1:]
        tail_mass = (1 - t_top.exp().sum(-1, keepdim=True)).clamp(min=1e-10)
        tp = torch.where(hit, t_full.gather(-1, idx), tail_mass.log() - math.log(8 - k)).exp()
        tail_s = (1 - p.sum(-1)).clamp(min=1e-8)
        tail_t = (1 - tp.sum(-1)).clamp(min=1e-8)
        m, mt = (0.5 * (p + tp)).log(), (0.5 * (tail_s + tail_t)).log()
        kl_s = (p0 * (lp - m)).sum(-1) + tail0 * (tail_s.log() - mt)
        kl_t = (tp * (tp.log() - m)).sum(-1) + tail_t * (tail_t.log() - mt)
        return (0.5 * (kl_s + kl_t)).sum()

    num = torch.zeros(8, dtype=torch.float64)
    for j in range(8):
        e = torch.zeros(1, 1, 8, dtype=torch.float64)
        e[..., j] = 1e-6
        num[j] = (surrogate(s.detach() + e) - surrogate(s.detach() - e)) / 2e-6
    torch.testing.assert_close(s.grad.view(-1), num, atol=1e-6, rtol=1e-4)


def test_ptd_gradient_differs_from_exact_jsd_on_purpose():
    """k = V: same value as the full-vocabulary JSD, but the sg(p_s) weight removes the
    gradient (the released form); --ptd-divergence jsd-exact has the JSD's own."""
    s = randn(7, 1, 1, 8, scale=1.5, dtype=torch.float64).requires_grad_()
    t = randn(8, 1, 1, 8, scale=1.5, dtype=torch.float64)
    ptd = D.ptd_topk_jsd(s, t, k=8)
    exact = D.divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), beta=0.5)
    torch.testing.assert_close(ptd, exact, atol=1e-6, rtol=1e-5)
    (g_ptd,) = torch.autograd.grad(ptd.sum(), s)
    (g_exact,) = torch.autograd.grad(exact.sum(), s)
    assert (g_ptd - g_exact).abs().max() > 1e-3
    (g_ours,) = torch.autograd.grad(D.ptd_topk_divergence(s, t, k=8, divergence="jsd-exact")
                                    .sum(), s)
    torch.testing.assert_close(g_ours, g_exact)


@given(seed=seeds, k=st.integers(1, 40), n=st.integers(1, 3), scale=st.floats(0.1, 3.0))
def test_released_ptd_jsd_has_exactly_zero_gradient(seed, k, n, scale):
    """The released "jsd_kl" (sg(p_s), sg(tail_s) as the weights of KL(S || M)): for any
    student and teacher logits its gradient with respect to the student is exactly 0.0, not
    small: per entry d/d log p_s = 0.5 p_s [1 - (p_s + p_t) / (2 m)] and 2 m = p_s + p_t to
    the bit (m is computed as 0.5 (p_s + p_t), and halving is exact). Its value is not 0:
    it is the JSD; only its gradient is gone."""
    s = randn(seed, n, 3, 64, scale=scale).requires_grad_()
    t = randn(seed + 1, n, 3, 64, scale=scale)
    jsd = D.ptd_topk_jsd(s, t, k=k)
    (g,) = torch.autograd.grad(jsd.sum(), s)
    assert torch.equal(g, torch.zeros_like(g))
    assert (jsd > 0).all()
    (g_exact,) = torch.autograd.grad(D.ptd_topk_divergence(s, t, k=k, divergence="jsd-exact")
                                     .sum(), s)  # the same value, its own gradient
    assert g_exact.abs().max() > 0


def _distill_terms(s, t, logp_s, logp_t):
    """Every distillation signal the trainer uses, as (name, scalar of the student)."""
    yield "opsd", D.distill_per_token(s, t, beta=0.0, token_clip=0.05).sum()  # OPSD v3
    yield "opsd-top-k", D.distill_per_token(s, t, beta=0.0, top_k=5, add_tail=False,
                                            support="teacher").sum()
    sd = D.sdpo_per_token(s, t, logp_s, logp_s.detach(), beta=0.5, top_k=5)
    yield "sdpo", sd.sum()
    w = D.entropy_weights(grpo.entropy(t.detach()), torch.ones(s.shape[:2]))
    yield "srpo", D.srpo_loss(torch.zeros_like(sd), sd, w, torch.ones(s.shape[0], dtype=bool),
                              torch.ones(s.shape[:2]))
    adv = D.opd_advantages(logp_s, logp_t)  # OPD: the reverse KL as a per-token advantage
    yield "opd", grpo.policy_loss(logp_s, logp_s.detach(), adv)[0].sum()
    for d in ("jsd-exact", "forward", "reverse"):
        yield f"ptd-{d}", D.ptd_topk_divergence(s, t, k=5, divergence=d).sum()


@given(seed=seeds, scale=st.floats(0.05, 0.5))
def test_every_other_distillation_signal_has_a_gradient_when_the_teacher_differs(seed, scale):
    """OPSD's, SDPO's, SRPO's, OPD's advantage and PTD-PO's other directions all move the
    student whenever the teacher's distribution differs from it (a perturbation small enough
    that OPSD's pointwise clip at 0.05 does not cut every entry)."""
    t = randn(seed, 2, 3, 12, scale=1.0)
    s = (t + randn(seed + 1, 2, 3, 12, scale=scale)).requires_grad_()
    tokens = torch.randint(0, 12, (2, 3), generator=torch.Generator().manual_seed(seed))
    logp_s = grpo.token_logprobs(s, tokens)
    logp_t = grpo.token_logprobs(t, tokens)
    for name, value in _distill_terms(s, t, logp_s, logp_t):
        (g,) = torch.autograd.grad(value, s, retain_graph=True)
        assert g.abs().max() > 0, name


@pytest.mark.parametrize("divergence", ["jsd-exact", "forward", "reverse"])
def test_ptd_divergences_gradient_is_their_own_in_float64(divergence):
    """Autograd against float64 central differences of the same function (distinct logits,
    so the top-k set is locally constant), on a support with a real tail (k < V)."""
    s = randn(3, 2, 2, 12, scale=1.5, dtype=torch.float64).requires_grad_()
    t = randn(4, 2, 2, 12, scale=1.5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: D.ptd_topk_divergence(z, t, k=4, miss_vocab=40, divergence=divergence),
        (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@given(seed=seeds, k=st.integers(2, 10))
def test_ptd_divergences_vanish_on_equal_logits_and_bound(seed, k):
    s, t = randn(seed, 2, 3, 16, scale=2.0), randn(seed + 1, 2, 3, 16, scale=2.0)
    for d in D.PTD_DIVERGENCES:
        assert (D.ptd_topk_divergence(s, s, k=k, divergence=d).abs() <= 1e-6).all(), d
        v = D.ptd_topk_divergence(s, t, k=k, divergence=d)
        assert (v >= -1e-6).all(), d
        if d.startswith("jsd"):
            assert (v <= math.log(2) + 1e-6).all(), d
    torch.testing.assert_close(D.ptd_topk_divergence(s, t, k=k, divergence="jsd-exact"),
                               D.ptd_topk_jsd(s, t, k=k))  # the same value


def test_ptd_teacher_ties_follow_the_ids_its_topk_kept():
    """Teacher logits tied at the k-th value (as bf16 logits often are): a student index tied
    with the k-th but not among the ids torch.topk kept gets the tail share, as the official
    id match does; the rule "reaches the k-th value" would give it its own probability."""
    k, V = 4, 16
    t = torch.linspace(3.0, -3.0, V).view(1, 1, V).clone()
    t[..., 4] = t[..., 3]  # the 4th and 5th largest tie
    t[..., 5] = t[..., 3]  # and the 6th
    kept = t.topk(k, -1).indices
    s = torch.zeros(1, 1, V)
    s[..., [0, 3, 4, 5, 9]] = torch.tensor([5.0, 4.0, 4.5, 3.5, 3.0])  # student's top-4
    ours = D.ptd_topk_jsd(s, t, k=k, miss_vocab=V)
    ref = _ptd_reference(s, t, k, V)  # the official equality match on the kept ids
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    tied_out = [i for i in (3, 4, 5) if i not in kept.view(-1).tolist()]
    assert tied_out  # some tied id was left out, and it matters:
    t_full = torch.log_softmax(t, -1)
    s_idx = s.topk(k, -1).indices
    by_value = t_full.gather(-1, s_idx) >= t_full.topk(k, -1).values[..., -1:]
    by_id = (s_idx[..., :, None] == kept[..., None, :]).any(-1)
    assert not torch.equal(by_value, by_id)


def test_ptdpo_loss_reductions_and_kl_switch():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 3, generator=g, requires_grad=True)
    ref = torch.randn(4, 3, generator=g)
    s_logits = torch.randn(4, 3, 10, generator=g, requires_grad=True)
    t_logits = torch.randn(4, 3, 10, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(4, 3)
    pg, _ = grpo.policy_loss(logp, logp.detach(), adv)
    kl = grpo.kl_k3(logp, ref)
    ptd = D.ptd_topk_jsd(s_logits, t_logits, k=4)
    rows = torch.tensor([True, False, True, False])
    group = torch.tensor([True, True, True, False])
    plain = grpo.aggregate(pg + 0.01 * kl, mask)
    assert torch.equal(D.ptdpo_loss(pg, kl, ptd, mask, rows, torch.zeros(4, dtype=torch.bool),
                                    ptd_coef=0.0), plain)
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(D.ptdpo_loss(pg, kl, ptd, mask, none, none), plain)
    total = D.ptdpo_loss(pg, kl, ptd, mask, rows, group, ptd_coef=0.5)
    expect = (grpo.aggregate(pg + 0.01 * torch.where(group[:, None], 0.0, kl), mask)
              + 0.5 * ptd[rows].mean())
    torch.testing.assert_close(total, expect)
    # the KL gradient reaches only the rollouts outside PTD groups
    (g_kl,) = torch.autograd.grad(D.ptdpo_loss(torch.zeros(4, 3), kl, ptd.detach(), mask,
                                               rows, group), logp)
    assert torch.equal(g_kl[:3], torch.zeros(3, 3)) and (g_kl[3] != 0).any()


# ---- further invariants (docs/API.md) ---------------------------------------------------------

@given(seed=seeds, beta=betas, top_k=st.sampled_from([None, 3]))
def test_masked_positions_do_not_change_the_loss(seed, beta, top_k):
    """OPSD 2.7.5: logits at prompt/pad positions are irrelevant; duplicating rows keeps the mean."""
    s, t = randn(seed, 2, 5, 7), randn(seed + 1, 2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    loss = grpo.aggregate(D.distill_per_token(s, t, beta=beta, top_k=top_k), mask)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e4, -1e4
    assert torch.equal(grpo.aggregate(D.distill_per_token(s2, t2, beta=beta, top_k=top_k), mask), loss)
    dup = grpo.aggregate(D.distill_per_token(torch.cat([s, s]), torch.cat([t, t]), beta=beta,
                                             top_k=top_k), torch.cat([mask, mask]))
    torch.testing.assert_close(dup, loss)


def test_sampled_token_estimator_matches_reverse_kl_gradient():
    """OPSD 2.7.8 / OPD: E_{y~p}[grad(-sg(A_y) log p_y)] with A = log q - log p is the exact
    gradient of KL(p || q) w.r.t. the student logits (Monte Carlo, 5 standard errors)."""
    z = torch.tensor([0.3, -1.0, 1.2, 0.1], dtype=torch.float64)
    lq = torch.log_softmax(torch.tensor([1.0, 0.5, -0.5, 0.0], dtype=torch.float64), -1)
    p = torch.softmax(z, -1)
    exact = p * (p.log() - lq) - p * (p * (p.log() - lq)).sum()
    n = 200_000
    y = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    adv = D.opd_advantages(p.log()[y], lq[y])          # (n,) per-token advantages
    onehot = torch.nn.functional.one_hot(y, 4).double()
    per_sample = -adv[:, None] * (onehot - p)           # grad of -A log p_y w.r.t. z
    mean, se = per_sample.mean(0), per_sample.std(0) / n ** 0.5
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all()


@given(seed=seeds)
def test_identical_teacher_and_student_give_zero_loss_and_gradient(seed):
    """SDPO 3.8.10: the logit-level advantage vanishes when the teacher agrees."""
    s = randn(seed, 2, 3, 9).requires_grad_()
    loss = D.sdpo_per_token(s, s.detach(), torch.zeros(2, 3), torch.zeros(2, 3), top_k=4).sum()
    loss.backward()
    assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-6


@given(seed=seeds, gap=st.floats(18.0, 40.0))
def test_tail_is_exact_when_the_top_k_holds_nearly_all_the_mass(seed, gap):
    """log(1 - sum p) from a sum close to 1 loses float32 precision; the tail from the logits
    outside the top-k does not (issue: up to 2e-4 absolute error at V=50, k=10)."""
    z = randn(seed, 4, 50)
    z[:, :10] += gap  # the top-10 hold all but ~e^-gap of the mass
    t = randn(seed + 1, 4, 50)
    ls, lt = D.topk_with_tail(z, t, 10)
    for logits, out in ((z, ls), (t, lt)):
        x = logits.double()
        idx = z.topk(10, -1).indices
        keep = torch.ones_like(x, dtype=torch.bool).scatter(-1, idx, False)
        ref = torch.logsumexp(x.masked_fill(~keep, float("-inf")), -1) - torch.logsumexp(x, -1)
        assert logits is t or (1 - ref.exp() > 1 - 1e-6).all()  # top-k mass above 1 - 1e-6
        torch.testing.assert_close(out[..., -1].double(), ref, atol=1e-6, rtol=1e-6)


def test_empty_tail_is_finite_with_finite_gradient():
    s = randn(0, 2, 6).requires_grad_()
    ls, lt = D.topk_with_tail(s, randn(1, 2, 6), 6)
    assert torch.isfinite(ls).all() and torch.isfinite(lt).all()
    D.divergence(ls, lt, beta=0.5).sum().backward()
    assert torch.isfinite(s.grad).all()
