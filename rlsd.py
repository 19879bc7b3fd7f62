"""RLSD: RLVR with self-distillation. The reward sets the direction, the teacher the size.

Paper: Chenxu Yang et al., "Self-Distilled RLVR", arXiv:2604.03128v1 (3 Apr 2026), Sec. 4.
Official code: github.com/iie-ycx/RLSD @ 93e46f7 (`dp_opsd_actor._build_stgca_advantages`).

The privileged teacher is the same model shown the ground-truth answer r. It re-scores the
tokens the student sampled; only the log-prob of each sampled token is needed.

    delta_t = sg( log P_T(y_t | x, r, y_<t) - log P_S(y_t | x, y_<t) )        Eq. (13)
    w_t     = exp( sign(A) * delta_t )                                        Eq. (14)
    A_t     = A * [ (1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w) ]       Eq. (15) + lambda mix
    L       = token-mean of the PPO/DAPO surrogate with A_t in place of A     (grpo.policy_loss)

Why it cannot go wrong the way OPSD does: w_t > 0, so the sign of every token's update is
the sign of the verifier's advantage; the teacher only makes a token's step up to
(1 + lam * eps_w) times larger or down to (1 - lam * eps_w) times smaller. If A > 0, tokens the
teacher finds likelier than the student get more credit; if A < 0, tokens the teacher finds
unlikely get more blame. With lam = 0 (the end of the schedule) this is exactly GRPO.

Choices where the paper and the official code differ (we follow the code, except the two
schedule numbers, where the paper's values are the default and the script's are one flag away):
  * lambda: the paper's Eq. 15 has no lambda; its prose and the code mix (1-lam) + lam*clip(w).
    lam0 = 0.5, linear decay to 0 over 50 steps (paper; the released script uses 60).
  * teacher: a frozen copy of the initial weights re-synced from the student every 10 steps
    (paper; the script uses 20). The sync lives in teachers.Teacher; this file is pure math.
  * Eq. 16 as translated puts w_t inside the PPO min/clip in place of rho_t. Read as a typo:
    the code, the README and every third-party port use the ordinary surrogate in rho_t
    with A_t as the advantage, and so do we.
  * aggregation: global token-mean (code), not the per-sequence mean of the paper's Eq. 2.
  * delta uses the student's current log-probs (code); on-policy they equal old_logp.
  * no KL-to-reference term, no entropy bonus (the released config disables both).
"""
import torch

from grpo import aggregate, policy_loss


def rlsd_token_advantages(adv: torch.Tensor, teacher_logp: torch.Tensor,
                          student_logp: torch.Tensor, *, lam: float,
                          eps_w: float = 0.2,  # paper and code: 0.2
                          mask: torch.Tensor | None = None, return_weights: bool = False):
    """(N,) sequence advantages + (N,T) sampled-token log-probs -> (N,T) token advantages.

    A_t = A * ((1 - lam) + lam * clip(exp(sign(A) * (teacher_logp - student_logp)), 1 +- eps_w)).
    The result is detached: the teacher only scales the step, it is never differentiated.
    Sign of A_t == sign of A; A = 0 gives 0; lam = 0 gives exactly A. `mask`, if given,
    zeroes padding positions. With return_weights, (A_t, w, clip(w)): the evidence weights
    before and after the clip, each (N,T) (rlsd_loss logs how often the clip acts).
    """
    with torch.no_grad():
        delta = teacher_logp.float() - student_logp.float()  # Eq. (13): stop-gradient
        # -inf - -inf (a padded position scored -inf by both) is NaN: treat it as "no evidence"
        delta = torch.nan_to_num(delta, nan=0.0)
        # clamp before exp: +-20 is far outside any clip range, and keeps w finite and > 0
        w = torch.exp((torch.sign(adv.float())[:, None] * delta).clamp(-20.0, 20.0))  # Eq. (14)
        w_clip = w.clamp(1.0 - eps_w, 1.0 + eps_w)  # Eq. (15): clip the ratio, not delta
        # the lambda mix: 1 + lam * (w_c - 1) is (1 - lam) + lam * w_c rearranged (the fw-ai
        # cookbook form). It is exactly 1.0 whenever lam == 0, eps_w == 0 or teacher ==
        # student, so those cases are GRPO bit for bit; the textbook form can round to
        # 0.99999994.
        adv_NT = adv.detach().float()[:, None] * (1.0 + lam * (w_clip - 1.0))  # Eq. (15) + lambda
    if mask is not None:
        adv_NT = torch.where(mask.bool(), adv_NT, torch.zeros_like(adv_NT))
    return (adv_NT, w, w_clip) if return_weights else adv_NT


def lambda_schedule(step: int, *, lam0: float = 0.5,   # paper and code: 0.5
                    warmup: int = 0,                    # code: 0
                    decay: int = 50) -> float:          # paper: 50 (released script: 60)
    """lambda at optimizer step `step` (counted from 1), as in the official trainer.

    Linear warm-up lam0 * step / warmup while step < warmup, then linear decay to 0 over
    `decay` steps; decay <= 0 keeps lam0. Once it reaches 0 RLSD is GRPO.
    """
    if warmup > 0 and step < warmup:
        return lam0 * step / warmup
    if decay > 0:
        return lam0 * max(1.0 - (step - warmup) / decay, 0.0)
    return lam0


def rlsd_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
              teacher_logp: torch.Tensor, mask: torch.Tensor, *, lam: float,
              eps_w: float = 0.2, clip_low: float = 0.2, clip_high: float = 0.28,
              dual_clip: float | None = 3.0, normalizer=None):
    """The RLSD objective: GRPO's surrogate with RLSD token advantages. Returns (loss, metrics).

    logp (N,T) current student log-probs with grad; old_logp (N,T) from the rollout policy;
    adv (N,) group advantages; teacher_logp (N,T) privileged-teacher log-probs of the same
    tokens; `normalizer` the global token count (see grpo.aggregate). With one optimizer step
    per rollout batch the trainer passes old_logp = logp.detach() (ratio 1); with several, the
    rollout policy's. The evidence ratio uses the current log-probs either way (below).
    metrics: the surrogate's (over `mask`), and the fraction of clipped weights and their mean
    over the tokens of rollouts with A != 0 (the lambda is the caller's: train.py logs it).
    """
    student_logp = logp.detach()  # the code's choice: current policy, recomputed in the update
    adv_NT, w, w_clip = rlsd_token_advantages(adv, teacher_logp, student_logp, lam=lam,
                                              eps_w=eps_w, return_weights=True)  # Eqs. 13-15
    per_token, metrics = policy_loss(logp, old_logp, adv_NT, clip_low=clip_low,
                                     clip_high=clip_high, dual_clip=dual_clip, mask=mask)
    loss = aggregate(per_token, mask, normalizer=normalizer)  # global token-mean (code)
    with torch.no_grad():
        # only tokens of rollouts with A != 0 have a weight that matters
        active = mask.bool() & (adv != 0)[:, None]
        n = active.sum().clamp(min=1)
        metrics["rlsd_weight_clip_frac"] = ((w != w_clip) & active).sum() / n
        metrics["rlsd_weight_mean"] = torch.where(active, w_clip, 0.0).sum() / n
    return loss, metrics
