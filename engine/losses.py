"""Each algorithm's loss on one chunk of response positions, from grpo.py, rlsd.py, distill.py.

The training step (train.update_mini_batch) runs `backward_chunked` once per micro-batch,
which calls `chunk_loss` once per chunk of positions: the chunk's logits, then the
algorithm's own small function (`grpo_chunk_loss`, `rlsd_chunk_loss`, ...), a few lines each
around the math of grpo.py, rlsd.py and distill.py. Their hyperparameters travel as one
frozen `LossOptions`, built once per step (never the run's Config). What else an algorithm
does differently is the row choice in `distilled_rows`:

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
one instead (docs/fidelity.md, RLSD).

Every normaliser is a GLOBAL count (all micro-batches, all ranks) (`Norms`), so the
chunks, micro-batches and ranks add up to the full-batch gradient.

The distillation term of OPSD, SDPO and PTD-PO is averaged as --distill-agg says, each mode
being a weight per distilled row on the sum of its per-token divergences, computed once per
update from the counts of the whole (mini-)batch (`distill_row_weights`), so every mode stays
independent of the micro-batch and process split:
  token-mean          / distilled tokens of the batch (every token weighs the same)
  seq-mean            per-row token mean, / distilled rows: OPSD's default, its paper's
                      Algorithm 1 (its trainer's per-micro-batch token mean equals this at
                      micro-batch 1 and is close at its 2-4; docs/fidelity.md F4)
  seq-mean-all-rows   per-row token mean, / ALL rows, undistilled ones adding 0: SDPO's default,
                      what its official configuration computes (micro-batch 1, each loss
                      divided by the gradient-accumulation count; docs/fidelity.md F3), so the term
                      shrinks with the share of rows that have a successful sibling
  micro-batch-mean    PTD-PO's default, its EasyR1 actor (docs/fidelity.md F9): the PTD token mean of each
                      micro-batch of PTD_MICRO_ROWS consecutive rows, weighted by that
                      micro-batch's share of the loss tokens; micro-batches without a PTD row
                      add 0, so sparse PTD rows get a smaller effective lambda than a global
                      mean would give (about 1 - (1 - p)^2 of it at a PTD share p). The rows
                      are fixed by their index, not by --micro-batch-size, so memory settings
                      never change the loss (the official micro-batches are token-budgeted,
                      so this is its 2-row reading)
SRPO's loss is one token mean over both branches (its paper, Eq. 8) and has no such option.
"""
import dataclasses
from dataclasses import dataclass

import torch

import distill
import grpo
import rlsd
from engine.teachers import lm_head_logits, response_hidden, sampled_token_logprobs

GRPO_FAMILY = ("grpo", "dr_grpo", "dapo", "gspo", "rloo")
SAMPLED_TOKEN_TEACHER = ("rlsd", "opd", "csd")              # Batch.teacher_logp, (N, T)
DISTRIBUTION_TEACHER = ("opsd", "sdpo", "srpo", "ptdpo")    # teacher logits per chunk


@dataclass
class Norms:
    """Global denominators (all ranks, all micro-batches). Each micro-batch's loss is its sum
    divided by these, so the micro-batch gradients add up to the full batch's gradient, however
    the batch is split (docs/architecture.md; verl's batch_num_tokens, RLSD's `x world / total`)."""
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


def distilled_rows(algo: str, b, *, group_size: int, ptd_tau: float, to_sdpo=None):
    """(distill (N,) bool or None, kl_off (N,) bool or None): the rows whose tokens the
    distillation term averages over, and PTD-PO's rows without the reference KL. `to_sdpo`:
    SRPO's routing (distill.srpo_route), computed once with the siblings the teacher is shown."""
    if algo in ("opsd", "sdpo"):  # every row whose teacher was shown something
        return b.has_context, None
    if algo == "srpo":  # SRPO Table 7: wrong, with a correct sibling; the rest goes to GRPO
        return b.has_context & to_sdpo.to(b.has_context.device), None
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


@dataclass(frozen=True)
class LossOptions:
    """The hyperparameters of the loss, one step's worth (train.loss_options builds it from
    the run's options): what the functions below read, and nothing else. Each field is the
    option of the same name (engine/config.py); `lam` is RLSD's lambda at this step and
    `dual_clip` None when the dual clip is off."""
    algo: str
    temperature: float = 1.0          # the rollout temperature: every loss scores at it
    lam: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_direction: str = "reverse"     # the k3 KL's (PTD-PO's released forward_kl: swapped)
    loss_agg: str = "token-mean"
    eps_w: float = 0.2
    opd_coef: float = 1.0
    beta: float = 0.5
    top_k: int = 100
    token_clip: float = 0.0
    is_clip: float = 2.0
    srpo_beta: float = 1.0
    ptd_coef: float = 0.05
    ptd_divergence: str = "jsd"
    attract: float = 0.5              # CSD: --csd-balance
    repel: float = 0.5
    eos_ids: tuple = ()               # equivalent end ids, merged into one action (2+ of them)


def chunk_loss(model, b, h_ntH, t0: int, t1: int, norms: Norms, opt: LossOptions,
               teacher=None, teacher_hidden=None):
    """(scalar loss, {metric: (sum, count)}) of `opt.algo` on response positions t0:t1 of the
    micro-batch `b`, from the student's hidden states `h_ntH` there and the teacher's
    `teacher_hidden` (the whole-distribution losses): the algorithm's own function, and the
    diagnostics every algorithm logs. `backward_chunked` calls it once per chunk, under
    activation checkpointing when there are several."""
    c, logits, logp, t_logits = chunk_inputs(model, b, h_ntH, t0, t1, opt, teacher,
                                             teacher_hidden)
    if opt.algo == "sft":
        return sft_chunk_loss(c, logp, norms)
    if opt.algo in ("grpo", "dr_grpo", "dapo", "rloo"):
        loss, stats = grpo_chunk_loss(c, logp, norms, opt)
    elif opt.algo == "gspo":
        loss, stats = gspo_chunk_loss(c, logp, norms, opt)
    elif opt.algo == "rlsd":
        loss, stats = rlsd_chunk_loss(c, logp, norms, opt)
    elif opt.algo == "opd":
        loss, stats = opd_chunk_loss(c, logp, norms, opt)
    elif opt.algo == "csd":
        loss, stats = csd_chunk_loss(c, logp, norms, opt)
    elif opt.algo == "opsd":
        loss, stats = opsd_chunk_loss(c, logits, t_logits, opt)
    elif opt.algo == "sdpo":
        loss, stats = sdpo_chunk_loss(c, logits, logp, t_logits, opt)
    elif opt.algo == "srpo":
        loss, stats = srpo_chunk_loss(c, logits, logp, t_logits, norms, opt)
    elif opt.algo == "ptdpo":
        loss, stats = ptdpo_chunk_loss(c, logits, logp, t_logits, norms, opt)
    else:
        raise ValueError(f"no loss for --algo {opt.algo}")
    return loss, {**stats, **diagnostics(c, logits, logp, t_logits, opt)}


def chunk_inputs(model, b, h_ntH, t0: int, t1: int, opt: LossOptions, teacher, teacher_hidden):
    """(c, logits, logp, teacher_logits) of one chunk: the micro-batch cut to positions t0:t1
    (Batch.positions), the student's (n, t, V) logits and (n, t) sampled-token log-probs, with
    gradient, and the teacher's (n, t, V) logits (None without `teacher_hidden`). With two or
    more equivalent end ids (--eos-ids), both sides' end tokens are one stopping action."""
    logits, c = lm_head_logits(model, h_ntH), b.positions(t0, t1)
    t_logits = (teacher.logits(model, teacher_hidden, t0, t1) if teacher_hidden is not None
                else None)
    tokens = c.resp_ids
    if len(opt.eos_ids) > 1:  # arXiv 2609.20511: merged before any divergence or ratio
        logits = distill.merge_equivalent_ends(logits, opt.eos_ids)
        t_logits = (distill.merge_equivalent_ends(t_logits, opt.eos_ids)
                    if t_logits is not None else None)
        tokens = distill.merge_end_tokens(tokens, opt.eos_ids)
        c = dataclasses.replace(c, resp_ids=tokens)
    logp = grpo.token_logprobs(logits, tokens, temperature=opt.temperature)
    return c, logits, logp, t_logits


# ----------------------------------------------------------------------------------------
# The shared pieces: the old policy, the clipped surrogate (+ KL), the statistics
# ----------------------------------------------------------------------------------------

def old_logprobs(c, logp):
    """The PPO ratio's old policy: the rollout policy's log-probs when a batch is updated in
    several steps (Batch.old_logp), else the current ones detached (the ratio is exactly 1)."""
    return c.old_logp if c.old_logp is not None else logp.detach()


def surrogate(c, logp, adv, opt: LossOptions, *, ratio=None, with_kl: bool = True):
    """(per-token loss (n, t), stats): the PPO/DAPO clipped surrogate of advantages `adv`
    against the old policy, or of the given (logp, old_logp) `ratio` pair (GSPO), plus the k3
    KL to the initial model when --kl-coef > 0 (and `with_kl`)."""
    ratio_logp, ratio_old = ratio if ratio is not None else (logp, old_logprobs(c, logp))
    per_tok, means = grpo.policy_loss(ratio_logp, ratio_old, adv, clip_low=opt.clip_low,
                                      clip_high=opt.clip_high, dual_clip=opt.dual_clip,
                                      mask=c.mask)
    stats = _as_stats(means, c.mask)
    if opt.kl_coef > 0 and with_kl:
        kl = grpo.kl_k3(logp, c.ref_logp, direction=opt.kl_direction)
        stats["kl"] = mean_stat(kl, c.mask)
        per_tok = per_tok + opt.kl_coef * kl
    return per_tok, stats


def aggregate_rows(per_tok, c, norms: Norms, opt: LossOptions):
    """--loss-agg over its global count: token-mean / loss tokens, the per-sequence mean /
    rows (each row's mean over its WHOLE length, Batch.row_tokens), Dr. GRPO's sum / (rows x
    max length)."""
    normalizer = {"token-mean": norms.tokens, "seq-mean-token-mean": norms.rows,
                  "seq-mean-token-sum-norm": norms.rows_x_len}[opt.loss_agg]
    return grpo.aggregate(per_tok, c.mask, mode=opt.loss_agg, normalizer=normalizer,
                          row_tokens=c.row_tokens)


def diagnostics(c, logits, logp, t_logits, opt: LossOptions) -> dict:
    """What every algorithm logs beside its loss, without gradient: the student's entropy over
    the loss tokens, and with a teacher the sampled-token estimate of KL(student || teacher)
    on the student's own tokens, mean of log pS(y_t) - log pT(y_t) over the distilled rows
    (every row for RLSD and OPD): the curve of RLSD's Fig. 3c."""
    T = opt.temperature
    out = {"entropy": mean_stat(grpo.entropy(logits.detach(), temperature=T), c.mask)}
    t_logp = (c.teacher_logp if t_logits is None else
              grpo.token_logprobs(t_logits, c.resp_ids, temperature=T))
    if t_logp is not None:
        rows = c.mask & c.distill[:, None] if c.distill is not None else c.mask
        out["teacher_kl"] = mean_stat(logp.detach() - t_logp, rows)
    return out


def _distill_mean(div, c, d_mask):
    """The distillation term of a chunk: its rows' weighted token sums (distill_row_weights)."""
    w = c.distill_w.to(div.dtype)[:, None]
    return grpo.aggregate(div * w, d_mask, normalizer=1.0)


def _top_k(opt: LossOptions, logits) -> int | None:
    """--top-k as a support size (0: the full vocabulary, None)."""
    return min(opt.top_k, logits.shape[-1]) if opt.top_k else None


# ----------------------------------------------------------------------------------------
# One function per algorithm: (loss, stats) of one chunk
# ----------------------------------------------------------------------------------------

def sft_chunk_loss(c, logp, norms: Norms):
    """The warm start's loss: the token-mean negative log-likelihood of the targets."""
    return grpo.aggregate(-logp, c.mask, normalizer=norms.tokens), {}


def grpo_chunk_loss(c, logp, norms: Norms, opt: LossOptions):
    """GRPO, Dr. GRPO, DAPO, RLOO: the clipped surrogate of the sequence advantage (their
    advantage scales differ in step 3), aggregated by --loss-agg over its global count."""
    per_tok, stats = surrogate(c, logp, c.adv, opt)
    return aggregate_rows(per_tok, c, norms, opt), stats


def gspo_chunk_loss(c, logp, norms: Norms, opt: LossOptions):
    """GSPO-token: each token carries its sequence's ratio sg[s_i], log s_i of the whole row
    computed before the loss (gspo_sequence_ratios; 0 with one update per batch, s_i = 1)."""
    log_s = (c.seq_log_ratio if c.seq_log_ratio is not None
             else torch.zeros(logp.shape[0], device=logp.device))
    ratio = (grpo.gspo_token_logp(logp, log_s), torch.zeros_like(logp))
    per_tok, stats = surrogate(c, logp, c.adv, opt, ratio=ratio)
    return aggregate_rows(per_tok, c, norms, opt), stats


def rlsd_chunk_loss(c, logp, norms: Norms, opt: LossOptions):
    """RLSD: the GRPO surrogate with A_t = A * ((1 - lam) + lam * clip(w_t)), its token
    advantages from the teacher's log-probs of the sampled tokens (rlsd.rlsd_loss)."""
    loss, means = rlsd.rlsd_loss(logp, old_logprobs(c, logp), c.adv, c.teacher_logp, c.mask,
                                 lam=opt.lam, eps_w=opt.eps_w, clip_low=opt.clip_low,
                                 clip_high=opt.clip_high, dual_clip=opt.dual_clip,
                                 normalizer=norms.tokens)
    active = c.mask & (c.adv != 0)[:, None]  # the weight statistics are over A != 0 tokens
    weights = {k: means.pop(k) for k in ("rlsd_weight_clip_frac", "rlsd_weight_mean")}
    return loss, {**_as_stats(weights, active), **_as_stats(means, c.mask)}


def opd_chunk_loss(c, logp, norms: Norms, opt: LossOptions):
    """OPD: a per-token advantage from the teacher, minus the sampled-token reverse KL."""
    adv_nt = opt.opd_coef * distill.opd_advantages(logp, c.teacher_logp)
    per_tok, stats = surrogate(c, logp, adv_nt, opt)
    stats["opd_reverse_kl"] = mean_stat(-adv_nt / max(opt.opd_coef, 1e-12), c.mask)
    loss = grpo.aggregate(per_tok, c.mask, normalizer=norms.tokens)
    return loss, stats


def csd_chunk_loss(c, logp, norms: Norms, opt: LossOptions):
    """Contrastive self-distillation, sampled-token form: the surrogate of A_t = attract *
    log T+(y_t) - repel * log T-(y_t) - (attract - repel) * log S(y_t) (distill.csd_advantages),
    T+ shown a correct sibling (Batch.teacher_logp), T- a wrong one (Batch.neg_logp), a token
    mean over the rows that have both."""
    adv_nt = distill.csd_advantages(logp, c.teacher_logp, c.neg_logp, attract=opt.attract,
                                    repel=opt.repel)
    d_mask = c.mask & c.distill[:, None]
    per_tok, stats = surrogate(c, logp, torch.where(d_mask, adv_nt, 0.0), opt)
    stats["csd_advantage"] = mean_stat(adv_nt, d_mask)
    return grpo.aggregate(per_tok, d_mask, normalizer=norms.distill_tokens), stats


def opsd_chunk_loss(c, logits, t_logits, opt: LossOptions):
    """OPSD: the divergence to the solution-shown teacher on its distilled rows. Its
    top_k_loss takes the TEACHER's top-k, renormalised, no tail bucket (docs/fidelity.md F8)."""
    d_mask = c.mask & c.distill[:, None]
    div = distill.distill_per_token(logits, t_logits, beta=opt.beta, top_k=_top_k(opt, logits),
                                    add_tail=False, token_clip=opt.token_clip or None,
                                    temperature=opt.temperature, support="teacher")
    return _distill_mean(div, c, d_mask), {"distill": mean_stat(div, d_mask)}


def sdpo_chunk_loss(c, logits, logp, t_logits, opt: LossOptions):
    """SDPO: top-k (+ tail) JSD to the sibling-shown teacher x the detached IS weight; it
    replaces the policy gradient (the released code's loss_mode)."""
    d_mask = c.mask & c.distill[:, None]
    sd, is_w = distill.sdpo_per_token(logits, t_logits, logp, old_logprobs(c, logp),
                                      beta=opt.beta, top_k=_top_k(opt, logits),
                                      is_clip=opt.is_clip, temperature=opt.temperature,
                                      return_weight=True)
    return _distill_mean(sd, c, d_mask), {"distill": mean_stat(sd, d_mask),
                                          "is_weight_mean": mean_stat(is_w, d_mask)}


def srpo_chunk_loss(c, logits, logp, t_logits, norms: Norms, opt: LossOptions):
    """SRPO: failed rows with a correct sibling to SDPO weighted by exp(-beta H_teacher), the
    rest to GRPO, one token mean over both (distill.srpo_loss)."""
    d_mask = c.mask & c.distill[:, None]
    pg, stats = surrogate(c, logp, c.adv, opt)
    sd = distill.sdpo_per_token(logits, t_logits, logp, old_logprobs(c, logp), beta=opt.beta,
                                top_k=_top_k(opt, logits), is_clip=opt.is_clip,
                                temperature=opt.temperature)
    h = grpo.entropy(t_logits, temperature=opt.temperature)  # teacher entropy, full vocabulary
    w = distill.entropy_weights(h, d_mask, beta=opt.srpo_beta, normalizer=norms.w_mean)
    loss = distill.srpo_loss(pg, sd, w, c.distill, c.mask, normalizer=norms.tokens)
    return loss, {**stats, "distill": mean_stat(sd, d_mask)}


def ptdpo_chunk_loss(c, logits, logp, t_logits, norms: Norms, opt: LossOptions):
    """PTD-PO: GRPO + k3 KL (off on PTD groups, so ptdpo_loss adds it) + lambda * Top-K JSD to
    the hint-shown reference (as released, a term with zero gradient: distill.py)."""
    pg, stats = surrogate(c, logp, c.adv, opt, with_kl=False)
    kl = grpo.kl_k3(logp, c.ref_logp, direction=opt.kl_direction)
    T = opt.temperature
    ptd = distill.ptd_topk_divergence(logits.float() / T, t_logits.float() / T,
                                      k=min(opt.top_k, logits.shape[-1]),
                                      divergence=opt.ptd_divergence)
    d_mask = c.mask & c.distill[:, None]
    loss = distill.ptdpo_loss(pg, kl, ptd, c.mask, c.distill, c.kl_off, ptd_coef=opt.ptd_coef,
                              kl_coef=opt.kl_coef, normalizer=norms.tokens,
                              ptd_row_weights=c.distill_w)
    return loss, {**stats, "kl": mean_stat(kl, c.mask & ~c.kl_off[:, None]),
                  "distill": mean_stat(ptd, d_mask)}


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

def backward_chunked(model, b, chunks: list, *, norms: Norms, opt: LossOptions, world: int,
                     metrics, teacher=None, teacher_hidden=None) -> float:
    """One micro-batch `b`: the student's hidden states (one forward), then `chunk_loss` on
    each chunk of positions (t0, t1) of `chunks`, then one backward. Returns the loss (a
    float) and adds the chunks' statistics to `metrics`. `teacher_hidden`: the teacher's
    hidden states of this micro-batch (Teacher.hidden), for the whole-distribution losses.

    With several chunks, each runs under activation checkpointing: its (n, t, V) logits, and
    the teacher's, are recomputed in backward instead of stored, so memory holds one chunk's
    logits, never the whole (n, T, V). One chunk (a small vocabulary) has nothing to save."""
    h_nTH = response_hidden(model, b.prompt_ids, b.prompt_mask, b.resp_ids, b.resp_mask,
                            **b.student_inputs(model))
    total = 0.0
    for t0, t1 in chunks:
        args = (model, b, h_nTH[:, t0:t1], t0, t1, norms, opt, teacher, teacher_hidden)
        if len(chunks) == 1:
            value, stats = chunk_loss(*args)
        else:
            value, stats = torch.utils.checkpoint.checkpoint(chunk_loss, *args,
                                                             use_reentrant=False)
        total = total + value
        metrics.add(stats)  # returned by the forward call only, never by the recompute
    # FSDP averages gradients over ranks; our normalisers are already global: undo it
    (total * world).backward()
    return float(total.detach())


def whole_batch_pass(model, teacher, mbs: list, chunks: list, norms: Norms, opt: LossOptions,
                     *, dist, logit_chunk: int):
    """The two losses that need the whole (mini-)batch before any chunk: SRPO's entropy-weight
    normaliser (`norms.w_mean`, a mean over all its SDPO tokens) and, with several updates per
    batch, GSPO's sequence ratio of every row (set on each micro-batch)."""
    if opt.algo == "srpo":
        norms.w_mean = srpo_weight_mean(model, teacher, mbs, chunks, srpo_beta=opt.srpo_beta,
                                        temperature=opt.temperature, dist=dist)
    if opt.algo == "gspo" and mbs[0].old_logp is not None:
        gspo_sequence_ratios(model, mbs, temperature=opt.temperature, logit_chunk=logit_chunk)


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
