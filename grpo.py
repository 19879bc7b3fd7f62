"""RLVR basics: log-probs, group advantages, the clipped surrogate and loss aggregation.

Every other algorithm in this project is built from the pieces in this file, so they are
written once, here, as pure functions of tensors.

Papers
  GRPO     Shao et al., "DeepSeekMath", arXiv:2402.03300v3. Group-relative advantage
           A_i = (r_i - mean) / std, PPO clipped surrogate, per-sequence mean (Eq. 3).
  Dr. GRPO Liu et al., "Understanding R1-Zero-Like Training", arXiv:2503.20783v2.
           A_i = r_i - mean (no std), token sum divided by a constant (Sec. 3.1).
  DAPO     Yu et al., arXiv:2503.14476v2. Asymmetric "clip-higher" (0.2 / 0.28, Eq. 10),
           global token-mean (Eq. 12), overlong reward shaping (Eq. 13).
  Dual-clip PPO: Ye et al., arXiv:1912.09729v3, Eq. 5 (caps the loss of A<0 tokens).
  RLOO     Ahmadian et al., "Back to Basics", arXiv:2402.14740v2 (Kool et al. 2019):
           A_i = r_i - mean of the other G - 1 rewards of the group (Eq. 5).
  GSPO     Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071v2: one
           length-normalised ratio per sequence, s_i = (pi/pi_old)(y_i)^(1/|y_i|) (Eq. 7),
           clipped to [1 - 3e-4, 1 + 4e-4]; here in its GSPO-token form (Eq. 13).

Objective (one token y_t of rollout i, rho = pi_theta / pi_old):
    l_t = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high))        PPO / DAPO
    l_t = min(l_t, -A c)  if A < 0                               dual clip, c = 3
    L   = aggregate(l, mask)                                      token-mean by default

Deliberate choices (follow verl, which every paper in this project was trained with):
  * the log-ratio is clamped to [-20, 20] before exp so a stale old_logp cannot overflow;
  * std uses Bessel's correction (torch.std) and eps = 1e-6 (verl; TRL uses 1e-4);
  * `token-mean` takes an explicit normalizer: the trainer passes the GLOBAL token count
    (all ranks, all micro-batches), so the gradient does not depend on how the batch was
    split. This is what verl's `batch_num_tokens` and the RLSD code's loss rescaling do.

Shapes: N rollouts (= P prompts x G, group by group), T response tokens, V vocabulary.
"""
import torch

# ----------------------------------------------------------------------------------------
# Rewards -> advantages
# ----------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> torch.Tensor:
    """(N,) rewards -> (N,) advantages, normalised within each group of `group_size` rows.

    scale="group": A = (r - mean) / (std + eps)       GRPO (DeepSeekMath Eq. 3 / Sec. 4.1.2)
    scale="none":  A = r - mean                        Dr. GRPO (Liu et al. Sec. 3.1)
    scale="loo":   A = r - mean of the others          RLOO (`rloo_advantages`)
    A group whose rewards are all equal gets exactly 0: it carries no learning signal, and
    float rounding in `r - mean` must not invent one (EasyR1's estimator, which PTD-PO
    releases, gives a flat group of equal non-binary rewards such as 0.9 an advantage of up
    to 0.056: (r - mean) is a rounding residue, and dividing by std + 1e-6 magnifies it).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale == "loo":
        return rloo_advantages(rewards, group_size)
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group', 'none' or 'loo', got {scale!r}")
    r_PG = rewards.float().view(-1, group_size)
    adv_PG = r_PG - r_PG.mean(dim=1, keepdim=True)
    if scale == "group" and group_size > 1:
        adv_PG = adv_PG / (r_PG.std(dim=1, keepdim=True) + eps)  # Bessel std, as verl/TRL
    constant = (r_PG == r_PG[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv_PG), adv_PG).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards -> (N,) REINFORCE leave-one-out advantages: each response's reward minus
    the mean of the OTHER G - 1 rewards of its group (Kool et al. 2019; RLOO, Ahmadian et
    al., arXiv:2402.14740v2, Eq. 5). It equals G / (G - 1) (r - mean): Dr. GRPO's advantage,
    rescaled, so a group's advantages sum to zero and a flat group gets exactly 0."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 rollouts per prompt (a leave-one-out baseline)")
    r_PG = rewards.float().view(-1, group_size)
    baseline = (r_PG.sum(dim=1, keepdim=True) - r_PG) / (group_size - 1)
    adv_PG = r_PG - baseline
    constant = (r_PG == r_PG[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv_PG), adv_PG).view(-1)


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, cache_len: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Eq. 13), added to the task reward. (N,) -> (N,).

    0 up to max_len - cache_len, then linear down to -factor at max_len, -factor beyond.
    """
    excess = lengths.float() - (max_len - cache_len)
    return -factor * (excess / cache_len).clamp(min=0.0, max=1.0)


# ----------------------------------------------------------------------------------------
# The clipped surrogate and the k3 KL
# ----------------------------------------------------------------------------------------

def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, *,
                clip_low: float = 0.2,      # PPO / DAPO eps_low
                clip_high: float = 0.28,    # DAPO clip-higher eps_high
                dual_clip: float | None = 3.0,  # Ye et al. 2019; verl clip_ratio_c
                mask: torch.Tensor | None = None):
    """PPO/DAPO surrogate per token. logp, old_logp (N,T); adv (N,) or (N,T).

    Returns (per_token_loss (N,T), metrics). Gradient flows through `logp` only: the old
    log-probs and the advantages are data. `mask` (optional) only restricts the metrics.
    """
    adv_NT = adv.detach()[:, None] if adv.dim() == 1 else adv.detach()
    # clamp: a log-ratio beyond +-20 only happens with stale or broken old_logp; exp would
    # overflow to inf and poison the whole batch (verl does the same)
    ratio = torch.exp((logp - old_logp.detach()).clamp(-20.0, 20.0))
    loss_unclipped = -adv_NT * ratio
    loss_clipped = -adv_NT * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)  # pessimistic bound (PPO Eq. 7)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        # for A < 0 a huge ratio would give an unbounded loss; cap it at -A * c
        capped = torch.minimum(loss, -adv_NT * dual_clip)
        dual = (adv_NT < 0) & (capped < loss)
        loss = torch.where(adv_NT < 0, capped, loss)
    with torch.no_grad():
        m = torch.ones_like(loss) if mask is None else mask.to(loss.dtype)
        n = m.sum().clamp(min=1.0)
        metrics = {
            "clip_frac": ((loss_clipped > loss_unclipped).float() * m).sum() / n,
            "dual_clip_frac": (dual.float() * m).sum() / n,
            "ratio_mean": (torch.where(m > 0, ratio, 0.0)).sum() / n,
        }
    return loss, metrics


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """(N,T) -> (N,): GSPO's log s_i = (1/|y_i|) sum_t log(pi_theta / pi_old)(y_t), the log
    of the length-normalised sequence ratio (Zheng et al., arXiv:2507.18071v2, Eq. 7)."""
    m = mask.to(logp.dtype)
    return ((logp - old_logp.detach()) * m).sum(1) / m.sum(1).clamp(min=1.0)


def gspo_token_logp(logp: torch.Tensor, seq_log_ratio: torch.Tensor) -> torch.Tensor:
    """(N,T) log-probs -> the (N,T) "log-ratio" of GSPO-token (Eq. 13), to hand to
    `policy_loss` with old_logp = 0: its value is the sequence's sg[log s_i] at every token,
    its gradient each token's own grad log pi(y_t). With one advantage per sequence and the
    per-sequence token mean this is GSPO's gradient exactly, and the sequence ratio can be
    computed once (no grad) while the loss runs a chunk of positions at a time."""
    return seq_log_ratio.detach()[:, None] + logp - logp.detach()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, *,
          direction: str = "reverse") -> torch.Tensor:
    """(N,T) -> (N,T): k3 estimator exp(ref - logp) - (ref - logp) - 1 of KL(pi || ref), >= 0.

    Schulman's "Approximating KL divergence" (2020); GRPO Eq. 4. The log-ratio is clamped to
    +-20 like the policy ratio and the value to at most 10 (verl `low_var_kl`), which leaves
    every realistic value unchanged. direction="forward" swaps the two log-probs, as PTD-PO's
    released `compute_kl(kl_direction="forward_kl")` does (its name for KL(ref || pi)): the
    same formula of d = logp - ref.
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"kl direction {direction!r}: expected reverse or forward")
    d = ref_logp.detach() - logp if direction == "reverse" else logp - ref_logp.detach()
    d = d.clamp(-20.0, 20.0)
    # and the value clamped to <= 10, as verl's / EasyR1's `low_var_kl` (docs/fidelity.md F16): one wild
    # token cannot dominate the batch's KL
    return (torch.exp(d) - d - 1.0).clamp(max=10.0)


# ----------------------------------------------------------------------------------------
# Aggregation: per-token loss -> scalar
# ----------------------------------------------------------------------------------------

def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, *, mode: str = "token-mean",
              normalizer: float | torch.Tensor | None = None,
              row_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(N,T) per-token loss and mask -> scalar.

    token-mean              sum(l * m) / normalizer, normalizer defaults to sum(m). DAPO Eq. 12.
                            The trainer passes the GLOBAL token count so that summing the
                            gradients of micro-batches (and ranks) gives the full-batch gradient.
    seq-mean-token-mean     mean over non-empty rows of each row's token mean. GRPO Eq. 3.
                            `normalizer`, if given, replaces the number of rows (global rows).
                            `row_tokens` (N,), if given, replaces each row's token count: the
                            trainer passes the WHOLE row's count when `per_token_loss` holds
                            only a chunk of its positions, so that chunks add up exactly.
    seq-mean-token-sum-norm sum(l * m) / normalizer, normalizer required: Dr. GRPO divides by
                            a constant (rows x max response length), never by the tokens present.
    An all-zero mask gives 0, never NaN. Masked positions are selected away, not multiplied by
    0, so a NaN or inf in padding cannot leak into the loss.
    """
    m = mask.bool()
    loss = torch.where(m, per_token_loss, torch.zeros_like(per_token_loss))
    if mode == "token-mean":
        denom = m.sum() if normalizer is None else normalizer
        return loss.sum() / torch.clamp(torch.as_tensor(denom, dtype=loss.dtype), min=1.0)
    if mode == "seq-mean-token-mean":
        count_N = m.sum(dim=-1) if row_tokens is None else row_tokens
        row_mean_N = loss.sum(dim=-1) / count_N.clamp(min=1).to(loss.dtype)
        denom = (count_N > 0).sum() if normalizer is None else normalizer
        return row_mean_N.sum() / torch.clamp(torch.as_tensor(denom, dtype=loss.dtype), min=1.0)
    if mode == "seq-mean-token-sum-norm":
        if normalizer is None:
            raise ValueError("seq-mean-token-sum-norm needs normalizer = rows x max length")
        return loss.sum() / normalizer
    raise ValueError(f"unknown aggregation mode {mode!r}")


# ----------------------------------------------------------------------------------------
# Memory: log-probabilities and entropy of the sampled tokens, a chunk of rows at a time.
# The rule: never materialise a float32 copy of (N, T, V) logits. The trainer already cuts the
# response into chunks of positions (engine/teachers.py, column_chunks); these kernels cut each chunk again
# into rows, so a 152k vocabulary costs a few hundred MiB whatever N and T are.
# ----------------------------------------------------------------------------------------

# Rows of (row, V) logits processed at once: 2**24 elements is 64 MiB of float32, so even a
# 152k vocabulary is handled ~110 positions at a time and never as one (N, T, V) copy.
CHUNK_ELEMENTS = 2**24


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)



class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(z / T)[y] computed a chunk of rows at a time, forward and backward.

    The naive `logits.float().log_softmax(-1).gather(...)` keeps a float32 (N, T, V) tensor
    alive for backward: 20 GB for 32 x 1024 tokens of a 152k vocabulary. Here only the
    per-row logsumexp is saved; backward recomputes softmax chunk by chunk and writes the
    gradient straight into one buffer of the logits' own dtype.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        flat, tok = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        step = _chunk_rows(flat.shape[1])
        for i in range(0, flat.shape[0], step):
            x = flat[i:i + step].float() / temperature  # the only float32 copy: one chunk
            lse[i:i + step] = torch.logsumexp(x, dim=-1)
            out[i:i + step] = x.gather(1, tok[i:i + step, None]).squeeze(1) - lse[i:i + step]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return out.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        temp = ctx.temperature
        flat, tok = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
        go = grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        step = _chunk_rows(flat.shape[1])
        for i in range(0, flat.shape[0], step):
            p = torch.exp(flat[i:i + step].float() / temp - lse[i:i + step, None])
            # d logp_y / d z_v = (1[v = y] - p_v) / T
            g = -p * go[i:i + step, None]
            g.scatter_add_(1, tok[i:i + step, None], go[i:i + step, None])
            grad[i:i + step] = g / temp
        return grad.view_as(logits), None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *,
                   temperature: float = 1.0) -> torch.Tensor:
    """(N,T,V) logits, (N,T) token ids -> (N,T) float32 log_softmax(logits/temperature)[tokens].

    The same numbers (to 1e-5) as the naive two lines
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1)
    but never allocates a float32 (N,T,V) copy (see _TokenLogprobs). `tokens` must be valid
    ids everywhere, padding included (pad with any id and mask the result).
    """
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature))


def _entropy_rows(x: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(x.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """(N,T,V) -> (N,T) entropy of softmax(logits / temperature), in chunks of rows.

    Used as a diagnostic and as SRPO's teacher entropy, both without gradient. If a gradient
    is asked for, each chunk is checkpointed so backward recomputes it instead of storing it.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    step, chunks = _chunk_rows(flat.shape[1]), []
    grad = torch.is_grad_enabled() and logits.requires_grad
    for i in range(0, flat.shape[0], step):
        if grad:
            chunks.append(torch.utils.checkpoint.checkpoint(
                _entropy_rows, flat[i:i + step], temperature, use_reentrant=False))
        else:
            chunks.append(_entropy_rows(flat[i:i + step], temperature))
    return torch.cat(chunks).view(logits.shape[:-1])
