"""Each algorithm's loss on one chunk of response positions, from grpo.py, rlsd.py, distill.py.

The training step (train.update_mini_batch) runs `backward_chunked` once per micro-batch,
which calls `chunk_loss` once per chunk of positions. Everything an algorithm does differently
is in one `if` branch of `chunk_loss`, plus the row choice in `distilled_rows`:

  algo      teacher (default)       its context   rows distilled                  loss
  grpo      -                       -             -                               surrogate + k3 KL 0.04, seq-mean
  dr_grpo   -                       -             -                               surrogate, sum / (rows x max len)
  dapo      -                       -             -                               surrogate, token-mean
  gspo      -                       -             -                               surrogate of the sequence ratio, seq-mean
  rloo      -                       -             -                               leave-one-out A, sum / (rows x max len)
  rlsd      initial, synced / 10    answer        - (every token reweighted)      surrogate with RLSD token advantages
  opd       external model          none          -                               surrogate with A_t = log pT - log pS
  opsd      frozen initial          solution      rows with a solution            forward KL, pointwise clip 0.05
  sdpo      EMA 0.05                sibling       rows with a correct sibling     top-100 JSD x IS weight
  srpo      EMA 0.05                sibling       wrong rows with a sibling       surrogate | weighted SDPO, one mean
  ptdpo     frozen initial          hint          wrong rows of unsolved groups   surrogate + KL + 0.05 Top-K JSD
                                                                                  (released: zero gradient)

The teacher and context columns are each paper's defaults (defaults.PAPER_DEFAULTS); the flags
--teacher-mode and --context change them. RLSD and OPD read only the teacher's log-prob of
each sampled token, computed once per step (`Batch.teacher_logp`); the four distillation
losses compare whole next-token distributions, so they get the teacher's logits of this
chunk (`teacher_logits`).

Old policy: by default there is one optimizer step per rollout batch, so the "old" log-probs
of the PPO ratio are the current ones detached, the ratio is exactly 1, and the clip ranges,
the dual clip and SDPO's IS weight never act (their metrics read 0, 0, 1). With
--mini-batch-size or --ppo-epochs the batch is updated in several steps, the old log-probs are
the rollout policy's (Batch.old_logp, scored once before the first update), and they all
act. RLSD's evidence ratio always compares the teacher with the CURRENT student (detached),
as its released code recomputes it in the update; the ExtPI re-implementation uses the old
one instead (spec notes, rlsd-opsd-sdpo "What student means in Delta").

Every normaliser is a GLOBAL count (all micro-batches, all ranks) (`Norms`), so the
chunks, micro-batches and ranks add up to the full-batch gradient.

The distillation term of OPSD, SDPO and PTD-PO is averaged as --distill-agg says, each mode
being a weight per distilled row on the sum of its per-token divergences, computed once per
update from the counts of the whole (mini-)batch (`distill_row_weights`), so every mode stays
independent of the micro-batch and process split:
  token-mean          / distilled tokens of the batch (every token weighs the same)
  seq-mean            per-row token mean, / distilled rows: OPSD's default, its paper's
                      Algorithm 1 (its trainer's per-micro-batch token mean equals this at
                      micro-batch 1 and is close at its 2-4; audit F4)
  seq-mean-all-rows   per-row token mean, / ALL rows, undistilled ones adding 0: SDPO's default,
                      what its official configuration computes (micro-batch 1, each loss
                      divided by the gradient-accumulation count; audit F3), so the term
                      shrinks with the share of rows that have a successful sibling
  micro-batch-mean    PTD-PO's default, its EasyR1 actor (audit F9): the PTD token mean of each
                      micro-batch of PTD_MICRO_ROWS consecutive rows, weighted by that
                      micro-batch's share of the loss tokens; micro-batches without a PTD row
                      add 0, so sparse PTD rows get a smaller effective lambda than a global
                      mean would give (about 1 - (1 - p)^2 of it at a PTD share p). The rows
                      are fixed by their index, not by --micro-batch-size, so memory settings
                      never change the loss (the official micro-batches are token-budgeted,
                      so this is its 2-row reading)
SRPO's loss is one token mean over both branches (its paper, Eq. 8) and has no such option.
"""
from dataclasses import dataclass
from functools import partial

import torch

import distill
import grpo
from engine.teachers import lm_head_logits, response_hidden, sampled_token_logprobs
from rlsd import rlsd_loss

GRPO_FAMILY = ("grpo", "dr_grpo", "dapo", "gspo", "rloo")
SAMPLED_TOKEN_TEACHER = ("rlsd", "opd")                     # Batch.teacher_logp, (N, T)
DISTRIBUTION_TEACHER = ("opsd", "sdpo", "srpo", "ptdpo")    # teacher logits per chunk


@dataclass
class Norms:
    """Global denominators (all ranks, all micro-batches). Each micro-batch's loss is its sum
    divided by these, so the micro-batch gradients add up to the full batch's gradient, however
    the batch is split (STYLE §3; verl's batch_num_tokens, RLSD's `x world / total` rescale)."""
    tokens: float                # loss tokens: token-mean (DAPO Eq. 12, the RLSD code)
    rows: float                  # rows with a loss token: GRPO's per-sequence mean (Eq. 3)
    rows_x_len: float            # rows x max_new_tokens: Dr. GRPO's constant (Sec. 3.1)
    distill_tokens: float        # tokens of distilled rows: OPSD, SDPO, SRPO, the PTD term
    distill_rows: float = 0.0    # distilled rows with a loss token (--distill-agg seq-mean)
    w_mean: float | None = None  # SRPO: mean exp(-beta H_teacher) over its SDPO tokens


def global_norms(b, *, max_new_tokens: int, dist) -> Norms:
    """The Norms of a (mini-)batch, all-reduced once: every micro-batch divides by them."""
    mask_NT = b.mask
    d_mask = mask_NT & b.distill[:, None] if b.distill is not None else mask_NT[:, :0]
    return Norms(tokens=dist.sum(mask_NT.sum()).item(),
                 rows=dist.sum((mask_NT.sum(1) > 0).sum()).item(),
                 rows_x_len=dist.sum(len(b.examples) * max_new_tokens).item(),
                 distill_tokens=dist.sum(d_mask.sum()).item(),
                 distill_rows=dist.sum((d_mask.sum(1) > 0).sum()).item())


def mean_stat(x: torch.Tensor, mask: torch.Tensor):
    """A metric as (sum, count) over `mask`: summed over chunks, micro-batches and ranks
    before dividing, so it is a mean over its own tokens. Detached 0-dim tensors: reading
    them (a GPU sync) happens once per step, not once per chunk."""
    mask = mask.bool()
    return torch.where(mask, x.detach().float(), 0.0).sum(), mask.sum()


def _as_stats(means: dict, mask: torch.Tensor) -> dict:
    """Means over `mask` (as grpo.policy_loss returns them) -> (sum, count) pairs."""
    n = mask.bool().sum()
    return {k: (v.detach() * n, n) for k, v in means.items()}


def distilled_rows(algo: str, b, *, group_size: int, success_threshold: float, ptd_tau: float):
    """(distill (N,) bool or None, kl_off (N,) bool or None): the rows whose tokens the
    distillation term averages over, and PTD-PO's rows without the reference KL."""
    if algo in ("opsd", "sdpo"):  # every row whose teacher was shown something
        return b.has_context, None
    if algo == "srpo":  # SRPO Table 7: wrong, with a correct sibling; the rest goes to GRPO
        return b.has_context & (b.rewards < success_threshold), None
    if algo == "ptdpo":  # official compute_ptd_mask: wrong rows of groups below tau, with a hint
        acc = b.correct.float().to(b.rewards.device)
        return (distill.ptd_mask(acc, group_size, b.has_context, tau=ptd_tau),
                distill.ptd_mask(acc, group_size, b.has_context, tau=ptd_tau,
                                 all_trajectories=True))
    return None, None


DISTILL_AGG = ("token-mean", "seq-mean", "seq-mean-all-rows", "micro-batch-mean")
PTD_MICRO_ROWS = 2  # PTD-PO config: micro_batch_size_per_device_for_update


def distill_row_weights(mode: str, b, norms) -> torch.Tensor:
    """(N,) weights w: the distillation term is sum_n w_n * sum_t div_nt over the distilled
    tokens. Counts are of this rank's whole (mini-)batch and global norms, never of a
    micro-batch."""
    d_NT = b.mask & b.distill[:, None]
    n_N = d_NT.sum(1).double()  # each distilled row's tokens
    one = torch.ones_like(n_N)
    if mode == "token-mean":
        return one / max(norms.distill_tokens, 1.0)
    if mode == "seq-mean":
        return one / n_N.clamp(min=1) / max(norms.distill_rows, 1.0)
    if mode == "seq-mean-all-rows":
        return one / n_N.clamp(min=1) / max(norms.rows, 1.0)
    if mode == "micro-batch-mean":
        k = PTD_MICRO_ROWS
        pad = (-len(n_N)) % k  # a last, shorter micro-batch
        tok_g = torch.nn.functional.pad(b.mask.sum(1).double(), (0, pad)).view(-1, k).sum(1)
        ptd_g = torch.nn.functional.pad(n_N, (0, pad)).view(-1, k).sum(1)
        w_g = tok_g / max(norms.tokens, 1.0) / ptd_g.clamp(min=1)
        return w_g.repeat_interleave(k)[:len(n_N)]
    raise ValueError(f"unknown --distill-agg {mode!r}")


def _distill_mean(div, c, d_mask):
    """The distillation term of a chunk: its rows' weighted token sums (distill_row_weights)."""
    w = c.distill_w.to(div.dtype)[:, None]
    return grpo.aggregate(div * w, d_mask, normalizer=1.0)


def chunk_loss(c, logits, logp, teacher_logits, norms, *, algo: str, lam: float,
               temperature: float, clip_low: float, clip_high: float, dual_clip: float,
               kl_coef: float, loss_agg: str, eps_w: float, opd_coef: float, beta: float,
               top_k: int, token_clip: float, is_clip: float, srpo_beta: float,
               ptd_coef: float, ptd_divergence: str):
    """(scalar loss, {metric: (sum, count)}) of `algo` on one chunk of positions. c is the
    micro-batch cut to the chunk's positions (batch.Batch); logits (n, t, V) and logp (n, t)
    are the student's, with gradient; teacher_logits (n, t, V) the teacher's distribution (or
    None); norms the global denominators (`Norms`); `lam` RLSD's lambda at this step. The
    keywords are the options of the same names (config.py), each read by its algorithms."""
    mask, T = c.mask, temperature
    stats = {"entropy": mean_stat(grpo.entropy(logits.detach(), temperature=T), mask)}
    # the PPO ratio's old policy: the rollout policy's log-probs when a batch is updated in
    # several steps (Batch.old_logp), else the current ones detached (ratio exactly 1)
    old = c.old_logp if c.old_logp is not None else logp.detach()
    dual_clip = dual_clip if dual_clip > 0 else None  # <= 0: no dual clip

    def surrogate(adv, with_kl=True, ratio_logp=logp, ratio_old=old):
        """The PPO/DAPO clipped surrogate per token against the old policy `old`, plus the k3
        KL to the initial model when --kl-coef > 0 (and `with_kl`)."""
        per_tok, means = grpo.policy_loss(ratio_logp, ratio_old, adv, clip_low=clip_low,
                                          clip_high=clip_high, dual_clip=dual_clip, mask=mask)
        stats.update(_as_stats(means, mask))
        if kl_coef > 0 and with_kl:
            kl = grpo.kl_k3(logp, c.ref_logp)
            stats["kl"] = mean_stat(kl, mask)
            per_tok = per_tok + kl_coef * kl
        return per_tok

    def sdpo(logits, teacher_logits, logp, old):
        """SDPO's per-token loss: top-k (+ tail) JSD x the detached IS weight min(pi/pi_old, 2)."""
        return distill.sdpo_per_token(logits, teacher_logits, logp, old, beta=beta,
                                      top_k=min(top_k, logits.shape[-1]) if top_k else None,
                                      is_clip=is_clip, temperature=T)

    if algo in GRPO_FAMILY:  # differ only in advantage scale, aggregation, clip, KL
        normalizer = {"token-mean": norms.tokens, "seq-mean-token-mean": norms.rows,
                      "seq-mean-token-sum-norm": norms.rows_x_len}[loss_agg]
        ratio = {}
        if algo == "gspo":  # each token carries its sequence's ratio sg[s_i] (GSPO-token):
            # log s_i of the whole row, computed before the loss (gspo_sequence_ratios;
            # 0 with one update per batch, where s_i = 1)
            log_s = (c.seq_log_ratio if c.seq_log_ratio is not None
                     else torch.zeros(logp.shape[0], device=logp.device))
            ratio = dict(ratio_logp=grpo.gspo_token_logp(logp, log_s),
                         ratio_old=torch.zeros_like(logp))
        loss = grpo.aggregate(surrogate(c.adv, **ratio), mask, mode=loss_agg,
                              normalizer=normalizer, row_tokens=c.row_tokens)

    elif algo == "rlsd":  # the GRPO surrogate with A_t = A * ((1-lam) + lam * clip(w_t))
        loss, means = rlsd_loss(logp, old, c.adv, c.teacher_logp, mask, lam=lam,
                                eps_w=eps_w, clip_low=clip_low, clip_high=clip_high,
                                dual_clip=dual_clip, normalizer=norms.tokens)
        active = mask & (c.adv != 0)[:, None]  # the weight statistics are over A != 0 tokens
        stats.update(_as_stats({k: means.pop(k) for k in ("rlsd_weight_clip_frac",
                                                          "rlsd_weight_mean")}, active))
        stats.update(_as_stats(means, mask))

    elif algo == "opd":  # a per-token advantage from the teacher: minus the reverse KL
        adv_nt = opd_coef * distill.opd_advantages(logp, c.teacher_logp)
        stats["opd_reverse_kl"] = mean_stat(-adv_nt / max(opd_coef, 1e-12), mask)
        loss = grpo.aggregate(surrogate(adv_nt), mask, normalizer=norms.tokens)

    elif algo == "opsd":  # OPSD's top_k_loss takes the TEACHER's top-k
        d_mask = mask & c.distill[:, None]
        # with --top-k, the teacher's top-k renormalised, no tail bucket (audit F8)
        div = distill.distill_per_token(logits, teacher_logits, beta=beta,
                                        top_k=min(top_k, logits.shape[-1]) or None, add_tail=False,
                                        token_clip=token_clip or None, temperature=T,
                                        support="teacher")
        stats["distill"] = mean_stat(div, d_mask)
        loss = _distill_mean(div, c, d_mask)

    elif algo == "sdpo":  # replaces the policy gradient (the released code's loss_mode)
        d_mask = mask & c.distill[:, None]
        sd = sdpo(logits, teacher_logits, logp, old)
        stats["distill"] = mean_stat(sd, d_mask)
        is_w = torch.exp((logp - old).detach().clamp(-20.0, 20.0)).clamp(max=is_clip)
        stats["is_weight_mean"] = mean_stat(is_w, d_mask)  # 1 with one update per batch
        loss = _distill_mean(sd, c, d_mask)

    elif algo == "srpo":  # failed rows with a sibling to weighted SDPO, the rest to GRPO
        d_mask = mask & c.distill[:, None]
        pg, sd = surrogate(c.adv), sdpo(logits, teacher_logits, logp, old)
        h = grpo.entropy(teacher_logits, temperature=T)  # teacher entropy, full vocabulary
        w = distill.entropy_weights(h, d_mask, beta=srpo_beta, normalizer=norms.w_mean)
        stats["distill"] = mean_stat(sd, d_mask)
        loss = distill.srpo_loss(pg, sd, w, c.distill, mask, normalizer=norms.tokens)

    elif algo == "ptdpo":  # GRPO + k3 KL (off on PTD groups) + lambda * Top-K JSD
        # the KL is added by ptdpo_loss, which switches it off on PTD groups
        pg, kl = surrogate(c.adv, with_kl=False), grpo.kl_k3(logp, c.ref_logp)
        V = logits.shape[-1]
        ptd = distill.ptd_topk_divergence(logits.float() / T, teacher_logits.float() / T,
                                          k=min(top_k, V), divergence=ptd_divergence)
        stats["kl"] = mean_stat(kl, mask & ~c.kl_off[:, None])
        stats["distill"] = mean_stat(ptd, mask & c.distill[:, None])
        loss = distill.ptdpo_loss(pg, kl, ptd, mask, c.distill, c.kl_off, ptd_coef=ptd_coef,
                                  kl_coef=kl_coef, normalizer=norms.tokens,
                                  ptd_row_weights=c.distill_w)
    else:
        raise ValueError(f"no loss for --algo {algo}")
    return loss, stats


@torch.no_grad()
def srpo_weight_sum(teacher_logits, c, *, srpo_beta: float, temperature: float):
    """(sum, count) of exp(-beta H_teacher) over one chunk's SDPO-routed tokens: the first pass
    of SRPO's two-pass normaliser, so the weights have mean 1 over the WHOLE batch (Sec. 3.2)."""
    h = grpo.entropy(teacher_logits, temperature=temperature).double()
    m = c.mask & c.distill[:, None]
    return torch.exp(-srpo_beta * h)[m].sum(), m.sum()


# ----------------------------------------------------------------------------------------
# The chunked backward of one micro-batch, and the two losses that need a pass before it
# ----------------------------------------------------------------------------------------

def backward_chunked(model, b, chunks: list, loss, *, world: int, metrics,
                     temperature: float = 1.0, teacher=None, teacher_hidden=None) -> float:
    """One micro-batch `b`: the student's hidden states (one forward), then per chunk of
    positions (t0, t1) its logits and sampled-token log-probs, the teacher's logits if
    `teacher_hidden` is given (Teacher.hidden), and `loss(c, logits, logp, teacher_logits)`
    -> (loss, stats) on the micro-batch cut to the chunk; then one backward. Returns the loss
    (a float) and adds the stats to `metrics`.

    With several chunks, each runs under activation checkpointing: its (n, t, V) logits, and
    the teacher's, are recomputed in backward instead of stored, so memory holds one chunk's
    logits, never the whole (n, T, V)."""
    h_nTH = response_hidden(model, b.prompt_ids, b.prompt_mask, b.resp_ids, b.resp_mask,
                            **b.student_inputs(model))

    def one_chunk(h_ntH, t0, t1):
        logits_ntV = lm_head_logits(model, h_ntH)
        c = b.positions(t0, t1)
        logp_nt = grpo.token_logprobs(logits_ntV, c.resp_ids, temperature=temperature)
        t_ntV = (teacher.logits(model, teacher_hidden, t0, t1) if teacher_hidden is not None
                 else None)
        return loss(c, logits_ntV, logp_nt, t_ntV)

    # one chunk (a small vocabulary): nothing to save by recomputing it in backward
    run = one_chunk if len(chunks) == 1 else partial(torch.utils.checkpoint.checkpoint,
                                                     one_chunk, use_reentrant=False)
    total = 0.0
    for t0, t1 in chunks:
        value, stats = run(h_nTH[:, t0:t1], t0, t1)
        total = total + value
        metrics.add(stats)  # returned by the forward call only, never by the recompute
    # FSDP averages gradients over ranks; our normalisers are already global: undo it
    (total * world).backward()
    return float(total.detach())


@torch.no_grad()
def gspo_sequence_ratios(model, mbs: list, *, temperature: float, logit_chunk: int):
    """GSPO's log s_i of every row under the CURRENT weights (set on each micro-batch), one
    no-grad forward per micro-batch: the ratio is a mean over the whole sequence, and the loss
    sees one chunk of positions at a time. With one update per batch s_i = 1 (not called)."""
    for mb in mbs:
        logp = sampled_token_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.resp_ids,
                                      mb.resp_mask, temperature=temperature,
                                      logit_chunk=logit_chunk, media=mb.media)
        mb.seq_log_ratio = grpo.sequence_log_ratio(logp, mb.old_logp, mb.resp_mask)


@torch.no_grad()
def srpo_weight_mean(model, teacher, mbs: list, chunks: list, *, srpo_beta: float,
                     temperature: float, dist) -> float:
    """Pass 1 of SRPO's two-pass normaliser: the mean of exp(-beta H_teacher) over every SDPO
    token of the batch (all ranks), so the weights have mean 1 over the whole batch (Sec. 3.2).
    It costs one more teacher forward per micro-batch: the teacher's hidden states are not
    kept from here to the loss, which would hold them for the whole batch at once."""
    total, count = 0.0, 0.0
    for mb, ch in zip(mbs, chunks):
        hidden = teacher.hidden(model, mb.teacher_ids, mb.teacher_mask, mb.resp_ids,
                                mb.resp_mask, **mb.teacher_inputs(model))
        for t0, t1 in ch:
            s, n = srpo_weight_sum(teacher.logits(model, hidden, t0, t1), mb.positions(t0, t1),
                                   srpo_beta=srpo_beta, temperature=temperature)
            total, count = total + s.item(), count + n.item()
    total, count = dist.sum(total).item(), dist.sum(count).item()
    return total / count if count else 1.0
