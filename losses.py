"""Each algorithm's loss on one chunk of response positions, from grpo.py, rlsd.py, distill.py.

The training step (train.train_step) calls `chunk_loss` once per chunk of positions of each
micro-batch. Everything an algorithm does differently is in one `if` branch below, plus the
row choice in `distilled_rows`:

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

The teacher and context columns are each paper's defaults (config.PAPER_DEFAULTS); the flags
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

Every normaliser is a GLOBAL count (all micro-batches, all ranks) from train.Norms, so the
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
import torch

import distill
import grpo
from rlsd import rlsd_loss

GRPO_FAMILY = ("grpo", "dr_grpo", "dapo", "gspo", "rloo")
SAMPLED_TOKEN_TEACHER = ("rlsd", "opd")                     # Batch.teacher_logp, (N, T)
DISTRIBUTION_TEACHER = ("opsd", "sdpo", "srpo", "ptdpo")    # teacher logits per chunk


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


def chunk_loss(cfg, c, logits, logp, teacher_logits, norms, lam: float):
    """(scalar loss, {metric: (sum, count)}) on one chunk. c is the micro-batch cut to the
    chunk's positions (batch.Batch); logits (n, t, V) and logp (n, t) are the student's, with
    gradient; teacher_logits(t0, t1) is the teacher's distribution (or None); `lam` is RLSD's
    lambda at this step."""
    mask, T = c.mask, cfg.temperature
    stats = {"entropy": mean_stat(grpo.entropy(logits.detach(), temperature=T), mask)}
    # the PPO ratio's old policy: the rollout policy's log-probs when a batch is updated in
    # several steps (Batch.old_logp), else the current ones detached (ratio exactly 1)
    old = c.old_logp if c.old_logp is not None else logp.detach()
    dual_clip = cfg.dual_clip if cfg.dual_clip > 0 else None  # <= 0: no dual clip

    def surrogate(adv, with_kl=True, ratio_logp=logp, ratio_old=old):
        """The PPO/DAPO clipped surrogate per token against the old policy `old`, plus the k3
        KL to the initial model when --kl-coef > 0 (and `with_kl`)."""
        per_tok, means = grpo.policy_loss(ratio_logp, ratio_old, adv, clip_low=cfg.clip_low,
                                          clip_high=cfg.clip_high, dual_clip=dual_clip, mask=mask)
        stats.update(_as_stats(means, mask))
        if cfg.kl_coef > 0 and with_kl:
            kl = grpo.kl_k3(logp, c.ref_logp)
            stats["kl"] = mean_stat(kl, mask)
            per_tok = per_tok + cfg.kl_coef * kl
        return per_tok

    if cfg.algo in GRPO_FAMILY:  # differ only in advantage scale, aggregation, clip, KL
        normalizer = {"token-mean": norms.tokens, "seq-mean-token-mean": norms.rows,
                      "seq-mean-token-sum-norm": norms.rows_x_len}[cfg.loss_agg]
        ratio = {}
        if cfg.algo == "gspo":  # each token carries its sequence's ratio sg[s_i] (GSPO-token):
            # log s_i of the whole row, computed before the loss (update.gspo_sequence_ratios;
            # 0 with one update per batch, where s_i = 1)
            log_s = (c.seq_log_ratio if c.seq_log_ratio is not None
                     else torch.zeros(logp.shape[0], device=logp.device))
            ratio = dict(ratio_logp=grpo.gspo_token_logp(logp, log_s),
                         ratio_old=torch.zeros_like(logp))
        loss = grpo.aggregate(surrogate(c.adv, **ratio), mask, mode=cfg.loss_agg,
                              normalizer=normalizer, row_tokens=c.row_tokens)

    elif cfg.algo == "rlsd":  # the GRPO surrogate with A_t = A * ((1-lam) + lam * clip(w_t))
        loss, means = rlsd_loss(logp, old, c.adv, c.teacher_logp, mask, lam=lam,
                                eps_w=cfg.eps_w, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                dual_clip=dual_clip, normalizer=norms.tokens)
        active = mask & (c.adv != 0)[:, None]  # the weight statistics are over A != 0 tokens
        stats.update(_as_stats({k: means.pop(k) for k in ("rlsd_weight_clip_frac",
                                                          "rlsd_weight_mean")}, active))
        stats.update(_as_stats({k: v for k, v in means.items() if k != "rlsd_lambda"}, mask))

    elif cfg.algo == "opd":  # a per-token advantage from the teacher: minus the reverse KL
        adv_nt = cfg.opd_coef * distill.opd_advantages(logp, c.teacher_logp)
        stats["opd_reverse_kl"] = mean_stat(-adv_nt / max(cfg.opd_coef, 1e-12), mask)
        loss = grpo.aggregate(surrogate(adv_nt), mask, normalizer=norms.tokens)

    elif cfg.algo == "opsd":  # OPSD's top_k_loss takes the TEACHER's top-k
        d_mask = mask & c.distill[:, None]
        # with --top-k, the teacher's top-k renormalised, no tail bucket (audit F8)
        div = distill.distill_per_token(logits, teacher_logits, beta=cfg.beta,
                                        top_k=cfg.top_k or None, add_tail=False,
                                        token_clip=cfg.token_clip or None, temperature=T,
                                        support="teacher")
        stats["distill"] = mean_stat(div, d_mask)
        loss = _distill_mean(div, c, d_mask)

    elif cfg.algo == "sdpo":  # replaces the policy gradient (the released code's loss_mode)
        d_mask = mask & c.distill[:, None]
        sd = _sdpo_per_token(cfg, logits, teacher_logits, logp, old)
        stats["distill"] = mean_stat(sd, d_mask)
        is_w = torch.exp((logp - old).detach().clamp(-20.0, 20.0)).clamp(max=cfg.is_clip)
        stats["is_weight_mean"] = mean_stat(is_w, d_mask)  # 1 with one update per batch
        loss = _distill_mean(sd, c, d_mask)

    elif cfg.algo == "srpo":  # failed rows with a sibling to weighted SDPO, the rest to GRPO
        d_mask = mask & c.distill[:, None]
        pg, sd = surrogate(c.adv), _sdpo_per_token(cfg, logits, teacher_logits, logp, old)
        h = grpo.entropy(teacher_logits, temperature=T)  # teacher entropy, full vocabulary
        w = distill.entropy_weights(h, d_mask, beta=cfg.srpo_beta, normalizer=norms.w_mean)
        stats["distill"] = mean_stat(sd, d_mask)
        loss = distill.srpo_loss(pg, sd, w, c.distill, mask, normalizer=norms.tokens)

    elif cfg.algo == "ptdpo":  # GRPO + k3 KL (off on PTD groups) + lambda * Top-K JSD
        # the KL is added by ptdpo_loss, which switches it off on PTD groups
        pg, kl = surrogate(c.adv, with_kl=False), grpo.kl_k3(logp, c.ref_logp)
        V = logits.shape[-1]
        ptd = distill.ptd_topk_divergence(logits.float() / T, teacher_logits.float() / T,
                                          k=min(cfg.top_k, V), divergence=cfg.ptd_divergence)
        stats["kl"] = mean_stat(kl, mask & ~c.kl_off[:, None])
        stats["distill"] = mean_stat(ptd, mask & c.distill[:, None])
        loss = distill.ptdpo_loss(pg, kl, ptd, mask, c.distill, c.kl_off, ptd_coef=cfg.ptd_coef,
                                  kl_coef=cfg.kl_coef, normalizer=norms.tokens,
                                  ptd_row_weights=c.distill_w)
    else:
        raise ValueError(f"no loss for --algo {cfg.algo}")
    return loss, stats


def _sdpo_per_token(cfg, logits, teacher_logits, logp, old):
    """SDPO's per-token loss: top-k (+ tail) JSD x the detached IS weight min(pi/pi_old, 2)."""
    V = logits.shape[-1]
    return distill.sdpo_per_token(logits, teacher_logits, logp, old, beta=cfg.beta,
                                  top_k=min(cfg.top_k, V) if cfg.top_k else None,
                                  is_clip=cfg.is_clip, temperature=cfg.temperature)


@torch.no_grad()
def srpo_weight_sum(teacher_logits, c, *, srpo_beta: float, temperature: float):
    """(sum, count) of exp(-beta H_teacher) over one chunk's SDPO-routed tokens: the first pass
    of SRPO's two-pass normaliser, so the weights have mean 1 over the WHOLE batch (Sec. 3.2)."""
    h = grpo.entropy(teacher_logits, temperature=temperature).double()
    m = c.mask & c.distill[:, None]
    return torch.exp(-srpo_beta * h)[m].sum(), m.sum()
