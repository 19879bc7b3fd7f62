"""grpo.py: hand-computed cases, properties, and gradients against naive float64 formulas."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import grpo
from conftest import randn


# ---- token_logprobs / entropy -------------------------------------------------------------

@given(seed=st.integers(0, 10_000), n=st.integers(1, 3), t=st.integers(1, 5),
       v=st.integers(2, 40), temp=st.sampled_from([0.5, 1.0, 1.3]),
       chunk=st.sampled_from([1, 7, 2**24]))
def test_token_logprobs_matches_naive_value_and_grad(seed, n, t, v, temp, chunk):
    old = grpo.CHUNK_ELEMENTS
    grpo.CHUNK_ELEMENTS = chunk * v  # force 1-row, 7-row or single chunks
    try:
        logits = randn(seed, n, t, v, scale=3.0).requires_grad_()
        tokens = torch.randint(0, v, (n, t), generator=torch.Generator().manual_seed(seed))
        w = randn(seed + 1, n, t)
        ours = grpo.token_logprobs(logits, tokens, temperature=temp)
        (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
        ref_in = logits.detach().double().requires_grad_()
        ref = torch.log_softmax(ref_in / temp, -1).gather(-1, tokens[..., None]).squeeze(-1)
        (g_ref,) = torch.autograd.grad((ref * w.double()).sum(), ref_in)
    finally:
        grpo.CHUNK_ELEMENTS = old
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours.double(), g_ref, atol=1e-5, rtol=1e-5)


def test_token_logprobs_hand_case():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax = [1/4, 3/4]
    out = grpo.token_logprobs(logits, torch.tensor([[1]]))
    assert out.item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_token_logprobs_keeps_no_float32_copy_of_bf16_logits():
    """The autograd graph must save the bf16 logits themselves, never a float32 (N,T,V)."""
    n, t, v = 2, 8, 64
    logits = randn(0, n, t, v).to(torch.bfloat16).requires_grad_()
    saved = []

    def pack(x):
        saved.append((x.dtype, x.numel()))
        return x

    old = grpo.CHUNK_ELEMENTS
    grpo.CHUNK_ELEMENTS = 4 * v
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = grpo.token_logprobs(logits, torch.zeros(n, t, dtype=torch.long))
    finally:
        grpo.CHUNK_ELEMENTS = old
    assert (torch.bfloat16, n * t * v) in saved
    assert not any(dt == torch.float32 and numel >= n * t * v for dt, numel in saved)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


@given(seed=st.integers(0, 10_000), temp=st.sampled_from([0.7, 1.0, 2.0]))
def test_entropy_matches_naive(seed, temp):
    logits = randn(seed, 2, 3, 11, scale=2.0)
    p = torch.softmax(logits.double() / temp, -1)
    ref = -(p * p.log()).sum(-1)
    torch.testing.assert_close(grpo.entropy(logits, temperature=temp).double(), ref,
                               atol=1e-5, rtol=1e-5)


def test_entropy_hand_case_and_gradient():
    assert grpo.entropy(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    x = randn(3, 2, 2, 5).requires_grad_()
    grpo.entropy(x).sum().backward()
    x2 = x.detach().double().requires_grad_()
    p = torch.softmax(x2, -1)
    (-(p * p.log()).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x2.grad, atol=1e-5, rtol=1e-5)


# ---- group advantages ------------------------------------------------------------------------

def test_group_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(r, 4)
    s = math.sqrt(1 / 3)  # Bessel std of [1, 0, 0, 1]
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.equal(a[4:], torch.zeros(4))
    torch.testing.assert_close(grpo.group_advantages(r, 4, scale="none")[:4],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))


@given(data=st.data(), g=st.sampled_from([1, 2, 3, 4, 8]), p=st.integers(1, 4),
       scale=st.sampled_from(["group", "none"]))
def test_group_advantages_sum_to_zero(data, g, p, scale):
    rewards = data.draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32),
                                 min_size=p * g, max_size=p * g))
    a = grpo.group_advantages(torch.tensor(rewards), g, scale=scale).view(p, g)
    assert torch.isfinite(a).all()
    assert (a.sum(1).abs() <= 1e-4 * max(1.0, a.abs().max().item())).all()


@given(value=st.floats(-100, 100, allow_nan=False, width=32), g=st.integers(1, 9),
       scale=st.sampled_from(["group", "none"]))
def test_group_advantages_vanish_on_equal_rewards(value, g, scale):
    a = grpo.group_advantages(torch.full((3 * g,), value), g, scale=scale)
    assert torch.equal(a, torch.zeros(3 * g))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(torch.zeros(4), 2, scale="batch")


def test_overlong_penalty():
    pen = grpo.overlong_penalty(torch.tensor([10, 16, 18, 20, 30]), max_len=20, cache_len=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


# ---- policy loss and KL ------------------------------------------------------------------------

def test_policy_loss_hand_case():
    # ratios 1.5 (A>0 -> clipped at 1.28), 0.5 (A<0 -> clipped at 0.8), 5.0 (A<0 -> dual clip 3)
    ratio = torch.tensor([[1.5, 0.5, 5.0]])
    logp = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, m = grpo.policy_loss(logp, torch.zeros(1, 3), adv)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8, 3.0]]))
    assert m["clip_frac"].item() == pytest.approx(2 / 3)  # first two clip; third is unclipped
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)
    loss.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 3))  # every token clipped: no gradient
    loss2, _ = grpo.policy_loss(logp, torch.zeros(1, 3), adv, dual_clip=None)
    assert loss2[0, 2].item() == pytest.approx(5.0, rel=1e-5)


@given(seed=st.integers(0, 10_000))
def test_policy_loss_on_policy_is_vanilla_pg(seed):
    """rho = 1: loss = -A and grad = -A * dlogp; old_logp and adv receive no gradient."""
    logp = randn(seed, 3, 4).requires_grad_()
    old = logp.detach().clone().requires_grad_()
    adv = randn(seed + 1, 3).requires_grad_()
    loss, _ = grpo.policy_loss(logp, old, adv)
    torch.testing.assert_close(loss, -adv.detach()[:, None].expand(3, 4))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv.detach()[:, None].expand(3, 4))
    assert old.grad is None and adv.grad is None


@given(seed=st.integers(0, 10_000))
def test_kl_k3_nonnegative_and_zero_iff_equal(seed):
    logp, ref = randn(seed, 4, 5, scale=3.0), randn(seed + 1, 4, 5, scale=3.0)
    k = grpo.kl_k3(logp, ref)
    assert (k >= 0).all()
    assert torch.equal(grpo.kl_k3(logp, logp), torch.zeros(4, 5))
    d = (ref - logp).double()
    ref_k3 = (d.exp() - d - 1).clamp(max=10.0)  # the value clamp of verl low_var_kl (F16)
    torch.testing.assert_close(k.double(), ref_k3, atol=1e-5, rtol=1e-5)


# ---- aggregation -------------------------------------------------------------------------------

def test_aggregate_modes_hand_case():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert grpo.aggregate(loss, mask).item() == pytest.approx(10 / 4)
    assert grpo.aggregate(loss, mask, normalizer=8).item() == pytest.approx(10 / 8)
    assert grpo.aggregate(loss, mask, mode="seq-mean-token-mean").item() == pytest.approx(3.0)
    assert grpo.aggregate(loss, mask, mode="seq-mean-token-sum-norm",
                          normalizer=6).item() == pytest.approx(10 / 6)
    with pytest.raises(ValueError, match="normalizer"):
        grpo.aggregate(loss, mask, mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown"):
        grpo.aggregate(loss, mask, mode="sum")


@pytest.mark.parametrize("mode,norm", [("token-mean", None), ("seq-mean-token-mean", None),
                                       ("seq-mean-token-sum-norm", 10.0)])
def test_aggregate_all_zero_mask_is_zero(mode, norm):
    x = torch.randn(2, 3, requires_grad=True)
    out = grpo.aggregate(x, torch.zeros(2, 3), mode=mode, normalizer=norm)
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros(2, 3))


@given(seed=st.integers(0, 10_000), cut=st.integers(1, 5),
       mode=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]))
def test_aggregate_gradient_independent_of_micro_batch_split(seed, cut, mode):
    """Sum of micro-batch gradients with the global normalizer == full-batch gradient."""
    logp = randn(seed, 6, 7).requires_grad_()
    adv = randn(seed + 1, 6)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 8, (6,), generator=g)
    mask = torch.arange(7)[None] < lengths[:, None]
    if mode == "token-mean":
        norm = mask.sum()
    elif mode == "seq-mean-token-mean":
        norm = (mask.sum(1) > 0).sum()
    else:
        norm = 6 * 7
    full = grpo.aggregate(grpo.policy_loss(logp, logp.detach(), adv)[0], mask, mode=mode,
                          normalizer=norm)
    (g_full,) = torch.autograd.grad(full, logp)
    total = 0.0
    for rows in (slice(0, cut), slice(cut, 6)):
        pt, _ = grpo.policy_loss(logp[rows], logp[rows].detach(), adv[rows])
        total = total + grpo.aggregate(pt, mask[rows], mode=mode, normalizer=norm)
    (g_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(g_split, g_full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-5)


@given(seed=st.integers(0, 10_000))
def test_seq_mean_token_mean_gradient_identity(seed):
    """GRPO 4.1(f): rho = 1, no KL: grad = -(1/G) sum_i (A_i / |y_i|) sum_t grad logp_it."""
    logp = randn(seed, 4, 6).requires_grad_()
    adv = randn(seed + 1, 4)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(6)[None] < lengths[:, None]
    loss = grpo.aggregate(grpo.policy_loss(logp, logp.detach(), adv)[0], mask,
                          mode="seq-mean-token-mean")
    (g,) = torch.autograd.grad(loss, logp)
    expect = -(adv / lengths)[:, None] / 4 * mask
    torch.testing.assert_close(g, expect.float())


@given(seed=st.integers(0, 10_000), cut=st.integers(1, 6),
       mode=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]))
def test_aggregate_adds_up_over_column_chunks(seed, cut, mode):
    """Chunks of response positions (the chunked LM head) with global normalizers and the whole
    rows' token counts add up to the full loss, the per-sequence mean included."""
    loss = randn(seed, 5, 7).requires_grad_()
    lengths = torch.randint(0, 8, (5,), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(7)[None] < lengths[:, None]
    norm = {"token-mean": mask.sum(), "seq-mean-token-mean": (mask.sum(1) > 0).sum(),
            "seq-mean-token-sum-norm": 5 * 7}[mode]
    full = grpo.aggregate(loss, mask, mode=mode, normalizer=norm)
    chunks = sum(grpo.aggregate(loss[:, c], mask[:, c], mode=mode, normalizer=norm,
                                row_tokens=mask.sum(1)) for c in (slice(0, cut), slice(cut, 7)))
    torch.testing.assert_close(chunks, full, atol=1e-6, rtol=1e-5)
    (g_full,) = torch.autograd.grad(full, loss)
    (g_chunks,) = torch.autograd.grad(chunks, loss)
    torch.testing.assert_close(g_chunks, g_full, atol=1e-6, rtol=1e-5)
    if mode == "seq-mean-token-mean" and 0 < cut < int(lengths.max()):  # without: a wrong mean
        wrong = sum(grpo.aggregate(loss[:, c], mask[:, c], mode=mode, normalizer=norm)
                    for c in (slice(0, cut), slice(cut, 7)))
        assert not torch.allclose(wrong, full)


def test_k3_value_is_clamped_like_verl():
    """verl / EasyR1 `low_var_kl` clamps the k3 value to <= 10 (docs/fidelity.md F16)."""
    logp = torch.tensor([[-30.0, 0.0, -1.0]])
    ref = torch.tensor([[0.0, 0.0, -1.5]])
    kl = grpo.kl_k3(logp, ref)
    assert kl[0, 0].item() == 10.0 and kl[0, 1].item() == 0.0
    assert kl[0, 2].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1.0)


# ---- RLOO ---------------------------------------------------------------------------------

def test_rloo_hand_computed():
    # r = 1 against the other three (1, 0, 0 -> mean 1/3); r = 0 against (1, 0, 1 -> 2/3)
    adv = grpo.rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 4)
    third = 1 / 3
    want = [2 * third, -2 * third, -2 * third, 2 * third, 1.0, -third, -third, -third]
    torch.testing.assert_close(adv, torch.tensor(want))
    assert torch.equal(grpo.group_advantages(torch.ones(4), 4, scale="loo"), torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        grpo.rloo_advantages(torch.ones(3), 1)


@given(seed=st.integers(0, 10_000), p=st.integers(1, 4), g=st.integers(2, 8))
def test_rloo_groups_sum_to_zero_and_rescale_dr_grpo(seed, p, g):
    r = torch.randint(0, 3, (p * g,), generator=torch.Generator().manual_seed(seed)).float()
    adv = grpo.group_advantages(r, g, scale="loo")
    assert adv.view(p, g).sum(1).abs().max() < 1e-5
    torch.testing.assert_close(adv, g / (g - 1) * grpo.group_advantages(r, g, scale="none"))


# ---- GSPO ---------------------------------------------------------------------------------

def _gspo_loss(logp, old, adv, mask, eps=(3e-4, 4e-4)):
    """The GSPO-token loss through policy_loss, aggregated as GSPO does (per-sequence mean)."""
    tok = grpo.gspo_token_logp(logp, grpo.sequence_log_ratio(logp, old, mask))
    per_tok, _ = grpo.policy_loss(tok, torch.zeros_like(logp), adv, clip_low=eps[0],
                                  clip_high=eps[1], dual_clip=None)
    return grpo.aggregate(per_tok, mask, mode="seq-mean-token-mean", normalizer=logp.shape[0])


@given(seed=st.integers(0, 10_000), n=st.integers(1, 5))
def test_gspo_with_one_token_per_sequence_is_the_token_ratio(seed, n):
    """|y_i| = 1: the sequence ratio is the token ratio, so GSPO is the PPO surrogate."""
    logp = randn(seed, n, 1, scale=0.5).requires_grad_()
    old, adv = randn(seed + 1, n, 1, scale=0.5), randn(seed + 2, n)
    mask = torch.ones(n, 1, dtype=torch.bool)
    ours = _gspo_loss(logp, old, adv, mask, eps=(0.2, 0.28))
    per_tok, _ = grpo.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=None)
    ref = grpo.aggregate(per_tok, mask, mode="seq-mean-token-mean", normalizer=n)
    (g_ours,), (g_ref,) = (torch.autograd.grad(x, logp) for x in (ours, ref))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), t=st.integers(1, 6),
       eps=st.sampled_from([(3e-4, 4e-4), (0.2, 0.28)]))
def test_gspo_token_form_has_the_sequence_form_gradient(seed, n, t, eps):
    """GSPO Eq. 5-7 written per sequence: -(1/N) sum_i min(s_i A_i, clip(s_i) A_i) with s_i the
    geometric mean ratio WITH its gradient; the token form gives the same value and gradient."""
    logp = randn(seed, n, t, scale=0.05).requires_grad_()
    old, adv = randn(seed + 1, n, t, scale=0.05) + logp.detach(), randn(seed + 2, n)
    mask = torch.rand(n, t, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 0] = True
    s = torch.exp(grpo.sequence_log_ratio(logp, old, mask))
    seq = -torch.minimum(s * adv, s.clamp(1 - eps[0], 1 + eps[1]) * adv).mean()
    ours = _gspo_loss(logp, old, adv, mask, eps)
    (g_ours,), (g_seq,) = (torch.autograd.grad(x, logp) for x in (ours, seq))
    torch.testing.assert_close(ours, seq)
    torch.testing.assert_close(g_ours, g_seq, atol=1e-6, rtol=1e-5)


@given(seed=st.integers(0, 10_000), t=st.integers(1, 6))
def test_gspo_ratio_is_a_geometric_mean(seed, t):
    """s_i is the geometric mean of the token ratios: appending a token whose log-ratio is
    log s_i leaves it unchanged (a log-ratio of 0 does so only when s_i = 1, the case the spec
    notes state); on-policy s_i = 1."""
    logp, old = randn(seed, 1, t), randn(seed + 1, 1, t)
    mask = torch.ones(1, t, dtype=torch.bool)
    log_s = grpo.sequence_log_ratio(logp, old, mask)
    logp2 = torch.cat([logp, old[:, :1] + log_s[:, None]], 1)
    old2 = torch.cat([old, old[:, :1]], 1)
    torch.testing.assert_close(grpo.sequence_log_ratio(logp2, old2, torch.ones(1, t + 1,
                                                                                dtype=torch.bool)),
                               log_s)
    assert grpo.sequence_log_ratio(logp, logp, mask).abs().max() == 0  # on-policy: s = 1
