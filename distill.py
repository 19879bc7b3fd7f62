"""On-policy (self-)distillation: OPD, OPSD, SDPO, SRPO and PTD-PO as pure tensor functions.

In every method here the student samples its own response y and a teacher re-scores the
same tokens (it never generates). They differ in who the teacher is, what it is shown, which
rollouts are distilled, and which divergence is used:

  OPD    Thinking Machines, "On-Policy Distillation" (blog, Oct 2025); tinker-cookbook.
         External teacher. Sampled-token reverse KL used as a per-token advantage:
         A_t = log pi_T(y_t) - log pi_S(y_t)                                    (`opd_advantages`)
  OPSD   Zhao et al., "Self-Distilled Reasoner", arXiv:2601.18734v3. Same model shown a
         reference solution; full-vocabulary forward KL (beta = 0, Eq. 7) with the v3
         pointwise clip min(l_v, tau = 0.05) before the vocabulary sum (Sec. 3.2). With a
         top-k, the teacher's top-k renormalised, no tail (its `generalized_jsd_loss`). The
         trainer's default mean is the paper's Algorithm 1, per sequence then over the batch
         (the released trainer's token mean per micro-batch of 1-4 rows is close to it; it
         is not one global token mean: docs/fidelity.md F4). OmniOPSD
         (arXiv:2606.15920v1) is OPSD with a rationale as the privileged context: no
         separate loss exists here, only another teacher prompt (data.py, batch.teacher_prompts).
  SDPO   Huebotter et al., "Reinforcement Learning via Self-Distillation", arXiv:2601.20802v2.
         Teacher sees a successful sibling rollout. Student top-K(100) + tail, generalised
         JSD alpha = 0.5 (Eq. 9), times a detached IS weight min(pi/pi_old, 2); it REPLACES the
         policy gradient (the paper's hybrid Eq. 3 is not in the released code). Its released
         configuration (micro-batch 1) averages each sequence's tokens and divides by ALL
         rows, rows without a sibling adding 0 (docs/fidelity.md F3): the trainer's default.
  SRPO   Li, Yang et al., "Sample-Routed Policy Optimization", arXiv:2604.02288v1. Failed
         rollouts with a correct sibling go to SDPO weighted by exp(-beta H_teacher)
         normalised to mean 1 (Sec. 3.2); everything else to GRPO; one shared token-mean
         denominator over both branches (Sec. 3.3).
  PTD-PO Xiang, An et al., arXiv:2606.07000v1; code github.com/XszNeverSleep/PTD-PO.
         Failed rollouts of not-all-correct groups are pulled toward the frozen reference
         shown an answer-free hint, with a Top-K JSD; loss = GRPO + lambda * PTD, and the
         reference KL is switched off on PTD groups. Its 384-prompt rollout batch is THREE
         optimizer steps of 128 (docs/fidelity.md F1).

Divergence convention (OPSD, SDPO and TRL share it): `beta` is the weight on the TEACHER.
beta = 0 is forward KL(T || S), beta = 1 is reverse KL(S || T), in between the generalised
JSD beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S. The endpoints are
special-cased because the mixture formula itself vanishes there. Teachers never get gradient.

Deliberate choices:
  * PTD-PO follows the official code, not the paper summary: the support is the student's
    top-K plus one tail bucket, teacher probabilities of student tokens outside the teacher's
    own top-K share the teacher's tail uniformly over (miss_vocab - K) tokens (the code
    hard-codes 150000; we default to the real V), and by default (--ptd-divergence jsd) p_s
    is stop-gradient as the weight of KL(S || M), as released. That makes the JSD's gradient
    exactly zero: the released PTD term is computed and logged and moves no weight, so
    released PTD-PO trains as GRPO with the reference KL switched off on the groups that
    have a hint. `ptd_topk_divergence` also offers the exact JSD (the paper's objective) and
    the two KLs on the same support. Kept different from the release on purpose: the
    teacher's log-softmax is taken in float32 (the release takes it in the logits' dtype,
    bf16 in its runs, which moves a token's JSD by up to 39%). `ptdpo_loss` takes the PTD term as a token mean over all PTD tokens, or as
    given row weights; the trainer's default weights reproduce the official per-micro-batch
    mean (losses.distill_row_weights, docs/fidelity.md F9) without depending on --micro-batch-size.
  * SRPO's advantages are Dr. GRPO's (r - mean), as the paper's text and its inherited SDPO
    config say, even though its displayed equation divides by std (config.py sets this).
  * Entropy weights are normalised over the tokens passed in; the trainer passes the global
    mean of the raw weights through `normalizer` when a batch is split.
"""
import math

import torch

from grpo import aggregate

_LOG_FLOOR = -1e4  # exp(-1e4) == 0 in any float: flooring -inf log-probs changes no value


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits are upcast; a float64 reference stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------
# Divergences over a shared support
# ----------------------------------------------------------------------------------------

def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, *, beta: float,
               token_clip: float | None = None) -> torch.Tensor:
    """(..., S) log-probs over one support -> (...) divergence summed over the last dim.

    beta = 0: KL(T || S); beta = 1: KL(S || T); else generalised JSD with M = beta T + (1-beta) S.
    token_clip = tau caps each summand at tau before the sum (OPSD v3, Sec. 3.2); the result can
    then be negative. Gradient flows into `student_logp` only.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    # floor -inf (a token with probability exactly 0) so that 0 * log 0 terms are 0, not NaN
    ls = _f32(student_logp).clamp(min=_LOG_FLOOR)
    lt = _f32(teacher_logp.detach()).clamp(min=_LOG_FLOOR)
    if beta == 0.0:
        elem = lt.exp() * (lt - ls)                                 # forward KL(T || S)
    elif beta == 1.0:
        elem = ls.exp() * (ls - lt)                                 # reverse KL(S || T)
    else:
        # log M = logsumexp(log(1-beta) + ls, log(beta) + lt), stable for tiny probabilities
        lm = torch.logaddexp(ls + math.log(1.0 - beta), lt + math.log(beta))
        elem = beta * lt.exp() * (lt - lm) + (1.0 - beta) * ls.exp() * (ls - lm)  # OPSD Eq. 7
    if token_clip is not None:
        elem = elem.clamp(max=token_clip)  # pointwise, per vocabulary entry (not per position)
    return elem.sum(-1)


def topk_with_tail(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, *,
                   add_tail: bool = True, support: str = "student"):
    """(..., V) logits -> (student_logp, teacher_logp), each (..., k+1), or (..., k) without tail.

    The support is the STUDENT's top-k (SDPO Eq. 9, verl and TRL); support="teacher" gives
    OPSD's `top_k_loss` variant. Both sides are normalised over the full vocabulary, then
    either a tail bucket log(1 - sum p) is appended (computed from the logits outside the
    top-k, so it is exact whatever the mass), or both are renormalised over the k entries.
    """
    s = _f32(student_logits)
    t = _f32(teacher_logits.detach())
    chooser = s if support == "student" else t
    idx = chooser.detach().topk(k, dim=-1).indices  # indices are data, not differentiated
    lse_s, lse_t = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(t, -1, keepdim=True)
    ls, lt = s.gather(-1, idx) - lse_s, t.gather(-1, idx) - lse_t
    if not add_tail:
        return (ls - torch.logsumexp(ls, -1, keepdim=True),
                lt - torch.logsumexp(lt, -1, keepdim=True))

    def tail(z, lse):
        # log of the mass OUTSIDE the top-k, from the logits outside it: exact in float32 even
        # when the top-k holds nearly all the mass, where log(1 - sum p) would subtract two
        # numbers close to 1 (the official codes' log(-expm1(.)) with a -1e-7 clamp loses
        # precision there). The top-k entries are replaced by lse - 1e4, whose exp is 0 in any
        # float, rather than -inf, so an empty tail (k = V) has a finite log and no NaN gradient.
        outside = z.scatter(-1, idx, (lse.detach() + _LOG_FLOOR).expand(idx.shape))
        return torch.logsumexp(outside, -1, keepdim=True) - lse

    return torch.cat([ls, tail(s, lse_s)], -1), torch.cat([lt, tail(t, lse_t)], -1)


def distill_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      beta: float, top_k: int | None = None, add_tail: bool = True,
                      token_clip: float | None = None, temperature: float = 1.0,
                      support: str = "student") -> torch.Tensor:
    """(N,T,V) student and teacher logits -> (N,T) divergence per position.

    Full vocabulary when top_k is None, else top-k (+ tail) as in `topk_with_tail`. Both
    logits are divided by the ROLLOUT temperature (OPSD uses 1.1, SDPO 1.0), as all codes do.
    The trainer calls this on chunks of positions so that (N,T,V) float32 never exists at once.
    """
    s, t = _f32(student_logits), _f32(teacher_logits.detach())
    if temperature != 1.0:  # a division by 1 would still copy two (.., V) tensors
        s, t = s / temperature, t / temperature
    if top_k is None:
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    else:
        ls, lt = topk_with_tail(s, t, top_k, add_tail=add_tail, support=support)
    return divergence(ls, lt, beta=beta, token_clip=token_clip)


def opd_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """(N,T) -> (N,T) detached teacher_logp - student_logp: minus the sampled-token reverse KL.

    Used as a per-token advantage in grpo.policy_loss (Thinking Machines OPD; OPSD Eq. 9).
    Positive where the teacher likes the sampled token more than the student does.
    """
    return (_f32(teacher_logp) - _f32(student_logp)).detach()


def merge_equivalent_ends(logits: torch.Tensor, end_ids) -> torch.Tensor:
    """(..., V) logits with the equivalent end tokens `end_ids` summed into ONE stopping action
    (arXiv 2609.20511): the first id's logit becomes logsumexp of theirs, the others get no
    mass (a logit 1e4 below every other, whose exp is 0 in any float). Student and teacher may
    put their stop mass on different ids of the same stop set (Qwen: <|im_end|> and
    <|endoftext|>); merged, every divergence (top-k and tail included) and every softmax sees
    the same action. With fewer than two ids the logits are returned as they are."""
    ids = list(dict.fromkeys(end_ids))
    if len(ids) < 2:
        return logits
    z = _f32(logits)
    merged = torch.logsumexp(z[..., ids], dim=-1)
    floor = z.detach().amin(dim=-1) + _LOG_FLOOR
    out = z.clone()
    out[..., ids[1:]] = floor[..., None].expand(*floor.shape, len(ids) - 1)
    out[..., ids[0]] = merged
    return out


def merge_end_tokens(tokens: torch.Tensor, end_ids) -> torch.Tensor:
    """(N, T) token ids with every equivalent end id replaced by the first: the sampled token
    as the merged stopping action of `merge_equivalent_ends` (for sampled-token log-probs)."""
    ids = list(dict.fromkeys(end_ids))
    if len(ids) < 2:
        return tokens
    return torch.where(torch.isin(tokens, torch.tensor(ids[1:], device=tokens.device)),
                       torch.full_like(tokens, ids[0]), tokens)


# ----------------------------------------------------------------------------------------
# Contrastive self-distillation: an attractive and a repulsive teacher
# ----------------------------------------------------------------------------------------

def csd_advantages(student_logp: torch.Tensor, pos_logp: torch.Tensor, neg_logp: torch.Tensor,
                   *, attract: float = 0.5, repel: float = 0.5) -> torch.Tensor:
    """(N,T) sampled-token log-probs -> (N,T) detached CSD advantages (arXiv 2609.21561).

    T+ is the model shown a correct solution, T- the model shown a wrong one, both on the
    student's prefix. The loss L = attract * KL(S || T+) - repel * KL(S || T-) has, per sampled
    token, the policy-gradient advantage
        A_t = attract * log T+(y_t) - repel * log T-(y_t) - (attract - repel) * log S(y_t)
    (its expectation under S is -grad L: `csd_divergence`'s gradient); the balanced default
    (1/2, 1/2) cancels the student term: A_t = 1/2 [log T+(y_t) - log T-(y_t)]. Attraction
    alone is OPD toward T+; repulsion alone pushes away from T-."""
    s, p, n = _f32(student_logp), _f32(pos_logp), _f32(neg_logp)
    return (attract * p - repel * n - (attract - repel) * s).detach()


def csd_divergence(student_logits: torch.Tensor, pos_logits: torch.Tensor,
                   neg_logits: torch.Tensor, *, attract: float = 0.5, repel: float = 0.5,
                   top_k: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(N,T,V) -> (N,T): the full-distribution CSD loss attract * KL(S || sg T+) -
    repel * KL(S || sg T-), on the full vocabulary or the student's top-k + tail (the same
    support for both teachers: the student chooses it). Gradient flows into the student only."""
    s = _f32(student_logits) / temperature
    p, n = _f32(pos_logits.detach()) / temperature, _f32(neg_logits.detach()) / temperature
    if top_k is None:
        ls, lp, ln = (torch.log_softmax(x, -1) for x in (s, p, n))
    else:
        ls, lp = topk_with_tail(s, p, top_k)
        _, ln = topk_with_tail(s, n, top_k)
    return (attract * divergence(ls, lp, beta=1.0) - repel * divergence(ls, ln, beta=1.0))


def csd_route(rewards: torch.Tensor, group_size: int, *, threshold: float = 0.5):
    """(N,) rewards -> (pos (N,) long, neg (N,) long): each rollout's first correct sibling
    and first wrong sibling (never itself; -1 for none), picked as SDPO picks its
    demonstration (`srpo_route`). A rollout is distilled only when it has both."""
    correct = rewards >= threshold
    return first_sibling(correct, group_size), first_sibling(~correct, group_size)


# ----------------------------------------------------------------------------------------
# SDPO: the self-teacher sees a successful sibling
# ----------------------------------------------------------------------------------------

def sdpo_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   logp: torch.Tensor, old_logp: torch.Tensor, *,
                   beta: float = 0.5,           # SDPO Table 12, no rich feedback: JSD 0.5
                   top_k: int | None = 100,     # Table 12: 100 (rich feedback: 20)
                   add_tail: bool = True, is_clip: float = 2.0,
                   temperature: float = 1.0, return_weight: bool = False):
    """SDPO per-token loss (N,T): top-k divergence x detached min(pi / pi_old, is_clip).

    The IS weight (SDPO App. A.3, code `is_clip`) corrects for several optimizer steps per
    rollout batch. It is a truncated weight, not a PPO clip, and carries no gradient; with one
    optimizer step per batch logp == old_logp and it is exactly 1. With return_weight,
    (loss, IS weight), each (N,T).
    """
    div = distill_per_token(student_logits, teacher_logits, beta=beta, top_k=top_k,
                            add_tail=add_tail, temperature=temperature)
    # clamp the log-ratio before exp (as the PPO ratio): the weight stays finite
    is_w = torch.exp((logp - old_logp).detach().clamp(-20.0, 20.0)).clamp(max=is_clip)
    return (div * is_w, is_w) if return_weight else div * is_w


def trust_region_logits(ref_logits: torch.Tensor, student_logits: torch.Tensor,
                        rate: float) -> torch.Tensor:
    """SDPO trust-region teacher (Eq. 6): logits (1 - rate) z_ref + rate z_student, no grad.

    Its softmax is the normalised geometric mixture of the two teacher distributions.
    """
    return torch.lerp(ref_logits.detach().float(), student_logits.detach().float(), rate)


@torch.no_grad()
def ema_update(teacher_params, student_params, rate: float) -> None:
    """In place, no grad: t <- (1 - rate) t + rate s for each pair (SDPO Eq. 15).

    rate = 0 leaves the teacher unchanged, rate = 1 copies the student, both exactly.
    """
    for t, s in zip(teacher_params, student_params, strict=True):
        t.lerp_(s.to(t.dtype), rate)


# ----------------------------------------------------------------------------------------
# SRPO: route failed rollouts with a correct sibling to weighted SDPO, the rest to GRPO
# ----------------------------------------------------------------------------------------

def first_sibling(flag: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool -> (N,) long: for each rollout, the first OTHER rollout of its group (in batch
    order) whose flag is set, or -1 (SDPO `_get_solution`: a row is never its own teacher)."""
    flag_PG = flag.bool().view(-1, group_size)
    P, G = flag_PG.shape
    not_self = ~torch.eye(G, dtype=torch.bool, device=flag.device)
    cand_PGG = flag_PG[:, None, :] & not_self  # [p, i, j]: j is a flagged sibling of i
    first = cand_PGG.int().argmax(-1)  # argmax returns the FIRST maximal index
    base = torch.arange(P, device=flag.device)[:, None] * G
    return torch.where(cand_PGG.any(-1), base + first, torch.full_like(first, -1)).view(-1)


def srpo_route(rewards: torch.Tensor, group_size: int, *, threshold: float = 0.5):
    """(N,) rewards -> (to_sdpo (N,) bool, sibling (N,) long). SRPO Sec. 3.1, Table 7.

    correct_i = r_i >= threshold (App. B.5). Rollout i has a teacher iff another rollout of its
    group is correct; sibling[i] is the first such rollout in batch order (SDPO `_get_solution`),
    else -1. to_sdpo = wrong and has a teacher; everything else (right, or wrong with no right
    sibling) falls back to GRPO. SDPO alone distils every rollout with sibling >= 0.
    """
    correct = rewards >= threshold
    sibling = first_sibling(correct, group_size)
    return ~correct & (sibling >= 0), sibling


def entropy_weights(teacher_entropy: torch.Tensor, mask: torch.Tensor, *, beta: float = 1.0,
                    normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """(N,T) teacher entropy -> (N,T) detached weights exp(-beta H) / mean_mask(exp(-beta H)).

    SRPO Sec. 3.2: confident teacher tokens count more. Mean 1 over `mask`, 0 outside; beta = 0
    gives ones. `normalizer` replaces the local mean of exp(-beta H) (the trainer passes the
    mean over all SDPO tokens of the batch). Computed in float64: exp(-beta H) underflows in
    float32 for large beta * H.
    """
    m = mask.bool()
    raw = torch.exp(-beta * teacher_entropy.detach().double())
    raw = torch.where(m, raw, torch.zeros_like(raw))
    if normalizer is None:
        normalizer = raw.sum() / m.sum().clamp(min=1)
    w = raw / torch.clamp(torch.as_tensor(normalizer, dtype=raw.dtype), min=1e-300)
    return w.to(torch.float32)


def srpo_loss(grpo_per_token: torch.Tensor, sdpo_per_token: torch.Tensor,
              weights: torch.Tensor, to_sdpo: torch.Tensor, mask: torch.Tensor, *,
              normalizer=None) -> torch.Tensor:
    """SRPO Sec. 3.3: one token-mean over both branches, no mixing coefficient. -> scalar.

    GRPO-routed rows contribute their surrogate loss, SDPO-routed rows weights * SDPO loss,
    and every routed token counts once in the shared denominator. A branch with no rows adds 0.
    """
    z_N1 = to_sdpo.bool()[:, None]
    per_token = torch.where(z_N1, weights * sdpo_per_token, grpo_per_token)
    return aggregate(per_token, mask, normalizer=normalizer)


# ----------------------------------------------------------------------------------------
# PTD-PO: failed rollouts pulled toward the hint-conditioned frozen reference
# ----------------------------------------------------------------------------------------

def ptd_mask(accuracy: torch.Tensor, group_size: int, has_hint: torch.Tensor, *,
             tau: float = 1.0, all_trajectories: bool = False) -> torch.Tensor:
    """(N,) accuracy in [0, 1], (N,) bool -> (N,) bool: which rollouts get the PTD loss.

    Official `compute_ptd_mask`: a group is active iff its fraction of fully correct rollouts
    is < tau; a rollout is distilled iff its group is active, it has a hint, and it is not fully
    correct (or all_trajectories). With all_trajectories=True this is the "PTD group" mask on
    which the reference KL is switched off. tau = 1 includes all-wrong groups: the hint is
    offline, so no correct sibling is needed.
    """
    full_PG = (accuracy == 1.0).view(-1, group_size)
    active_PG = full_PG.float().mean(dim=1, keepdim=True) < tau
    distil_PG = active_PG & (~full_PG | all_trajectories)
    return distil_PG.view(-1) & has_hint.bool()


PTD_DIVERGENCES = ("jsd", "jsd-exact", "forward", "reverse")


def _ptd_support(student_logits, teacher_logits, k: int, miss_vocab: int | None):
    """The K+1 support of official `compute_topk_kl`: the student's top-k and one tail bucket.
    Returns (s_lp, s_p, t_lp, t_p, tail_s, tail_t): the student's (with gradient) and the
    teacher's (no gradient) log-probs and probabilities on the k entries, and both tails.

    The teacher's probability at a student index is its own, when the index is among the k
    ids the teacher's `torch.topk` kept, else an equal share of the teacher's tail over
    (miss_vocab - k) tokens, as the official `_topk_match_and_gather` matches ids. (A
    "reaches the k-th value" test would admit every token tied with the k-th: under bf16
    logits ties are common, and it changes the value.) Membership is one sort and a binary
    search per position, not the official k x k comparison. Both sides are normalised in
    float32 over the whole vocabulary; the official code takes the teacher's log-softmax in
    the logits' own dtype, which with bf16 logits moves a token's JSD by up to 39%."""
    s = _f32(student_logits)
    V = s.shape[-1]
    miss_vocab = V if miss_vocab is None else miss_vocab
    s_idx = s.detach().topk(k, dim=-1).indices  # indices are data, not differentiated
    s_lp = s.gather(-1, s_idx) - torch.logsumexp(s, -1, keepdim=True)
    with torch.no_grad():
        t_lp_full = torch.log_softmax(_f32(teacher_logits.detach()), -1)
        t_top_lp, t_idx = t_lp_full.topk(k, dim=-1)
        kept = t_idx.sort(dim=-1).values
        at = torch.searchsorted(kept, s_idx).clamp(max=k - 1)
        hit = kept.gather(-1, at) == s_idx  # the id is one the teacher's top-k kept
        t_tail_mass = (1.0 - t_top_lp.exp().sum(-1, keepdim=True)).clamp(min=1e-10)
        miss_lp = t_tail_mass.log() - math.log(max(1, miss_vocab - k))
        t_lp = torch.where(hit, t_lp_full.gather(-1, s_idx), miss_lp).clamp(min=_LOG_FLOOR)
    s_p, t_p = s_lp.exp(), t_lp.exp()
    tail_s = (1.0 - s_p.sum(-1)).clamp(min=1e-8)  # clamps as in the official code
    tail_t = (1.0 - t_p.sum(-1)).clamp(min=1e-8)
    return s_lp, s_p, t_lp, t_p, tail_s, tail_t


def ptd_topk_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                        k: int = 100, miss_vocab: int | None = None,
                        divergence: str = "jsd") -> torch.Tensor:
    """(N,T,V) -> (N,T) PTD-PO's divergence on the student's top-k + tail (`_ptd_support`).

    divergence (--ptd-divergence):
      jsd        the released "jsd_kl" (every PTD script): JSD whose KL(S || M) term weighs by
                 a detached p_s (and tail_s). Its gradient is EXACTLY ZERO: per entry,
                 d/d log p_s = 0.5 p_s [1 - (p_s + p_t) / (2 m)] = 0 since 2 m = p_s + p_t, and
                 the tail likewise. The term moves no weight (`ptd_topk_jsd`).
      jsd-exact  the same value, with the JSD's own gradient: what the paper describes
      forward    KL(T || S) on the same support: the official "reverse_kl" (its names are
                 swapped relative to this project's and SDPO's: docs/fidelity.md, PTD-PO)
      reverse    KL(S || T): the official "forward_kl", used by the PID-era "fwd" scripts
    The JSD forms lie in [0, ln 2]; every form is 0 when the logits are equal."""
    if divergence not in PTD_DIVERGENCES:
        raise ValueError(f"PTD divergence {divergence!r}: expected one of {PTD_DIVERGENCES}")
    s_lp, s_p, t_lp, t_p, tail_s, tail_t = _ptd_support(student_logits, teacher_logits, k,
                                                        miss_vocab)
    if divergence == "forward":  # KL(T || S): the teacher's mass where the student lacks it
        return (t_p * (t_lp - s_lp)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())
    if divergence == "reverse":  # KL(S || T): the student's mass where the teacher lacks it
        return (s_p * (s_lp - t_lp)).sum(-1) + tail_s * (tail_s.log() - tail_t.log())
    log_m = (0.5 * (s_p + t_p)).clamp(min=1e-10).log()
    log_m_tail = (0.5 * (tail_s + tail_t)).clamp(min=1e-10).log()
    w_s, w_tail = (s_p.detach(), tail_s.detach()) if divergence == "jsd" else (s_p, tail_s)
    kl_sm = (w_s * (s_lp - log_m)).sum(-1) + w_tail * (tail_s.log() - log_m_tail)
    kl_tm = (t_p * (t_lp - log_m)).sum(-1) + tail_t * (tail_t.log() - log_m_tail)
    return 0.5 * (kl_sm + kl_tm)


def ptd_topk_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                 k: int = 100, miss_vocab: int | None = None) -> torch.Tensor:
    """(N,T,V) -> (N,T) PTD-PO's Top-K JSD as released (official `compute_topk_kl`, "jsd_kl").

    Support: the student's top-k plus one tail bucket; the teacher's probability at a student
    index is its own if the teacher's top-k kept that id, else an equal share of its tail over
    (miss_vocab - k) tokens (the code hard-codes 150000; we default to the real V). p_s (and
    tail_s) are stop-gradient as the weight of KL(S || M), which the official comment says
    "bounds the gradient when p_s -> 0": it removes it. The gradient with respect to the
    student is exactly zero, so the released PTD term trains nothing (`ptd_topk_divergence`
    has the exact JSD and the KLs). 0 when the logits are equal; <= ln 2 up to the 1e-8 tail
    clamps."""
    return ptd_topk_divergence(student_logits, teacher_logits, k=k, miss_vocab=miss_vocab,
                               divergence="jsd")


def ptdpo_loss(pg_per_token: torch.Tensor, kl_per_token: torch.Tensor,
               ptd_per_token: torch.Tensor, mask: torch.Tensor, ptd_rows: torch.Tensor,
               ptd_group_rows: torch.Tensor, *,
               ptd_coef: float = 0.05,   # official scripts: 0.05 for 2B/8B, 0.5 for 4B
               kl_coef: float = 0.01,    # EasyR1 config_grpo.yaml, k3
               normalizer=None, ptd_normalizer=None, ptd_row_weights=None) -> torch.Tensor:
    """PTD-PO total loss: GRPO (+ k3 KL off PTD groups) + ptd_coef * PTD mean. -> scalar.

    pg_per_token, kl_per_token, ptd_per_token, mask (N,T); ptd_rows = ptd_mask(...),
    ptd_group_rows = ptd_mask(..., all_trajectories=True). `normalizer` is the global token
    count. The PTD mean is a token mean over `ptd_normalizer` (the global count of PTD
    tokens), or, with `ptd_row_weights` (N,), sum_n w_n * sum_t ptd_nt: the trainer's
    micro-batch-faithful mean (losses.distill_row_weights). ptd_coef = 0 or no PTD rows gives
    the GRPO(+KL) loss bit for bit.
    """
    kl = torch.where(ptd_group_rows.bool()[:, None], torch.zeros_like(kl_per_token), kl_per_token)
    rl = aggregate(pg_per_token + kl_coef * kl, mask, normalizer=normalizer)
    ptd_mask_NT = mask.bool() & ptd_rows.bool()[:, None]
    if ptd_row_weights is not None:
        weighted = ptd_per_token * ptd_row_weights.to(ptd_per_token.dtype)[:, None]
        return rl + ptd_coef * aggregate(weighted, ptd_mask_NT, normalizer=1.0)
    return rl + ptd_coef * aggregate(ptd_per_token, ptd_mask_NT, normalizer=ptd_normalizer)
