"""What each algorithm does with a batch: rollouts, teacher prompts, teachers, losses.

The training loop (train.py) is the same for every algorithm; what differs lives here as
small functions, each a few lines over grpo.py / rlsd.py / distill.py:
    collect             sample G rollouts per prompt, score them, compute advantages
    add_teacher_prompts the privileged prompt of each row (answer, solution, hint, rationale,
                        or a correct sibling's response), followed by the SAME response ids
    Teacher             who scores that prompt: live, frozen, sync, ema, trust, external
    LOSSES[algo]        the per-micro-batch loss, normalised by global counts (Norms)
"""
import dataclasses
from dataclasses import dataclass

import torch

import data
import distill as D
import grpo
from distributed import gathered, reshard
from rlsd import lambda_schedule, rlsd_loss
from rollout import Rollouts, generate, left_pad, lm_head_logits, response_hidden


class Teacher:
    """Who scores the privileged prompt. Never trained; every forward runs under no_grad.

    live      the current student weights                       (OPSD/SDPO "current")
    frozen    a copy of the initial weights                     (OPSD, PTD-PO)
    sync      frozen copy re-synced from the student every N    (RLSD)
    ema       t <- (1 - a) t + a s after each optimizer step     (SDPO, SRPO)
    trust     logits (1 - a) z_init + a z_student               (SDPO trust region)
    external  another model                                     (OPD)
    """

    @staticmethod
    def needs_initial_copy(cfg) -> bool:
        """A frozen copy of the initial weights: as the teacher, or as the KL reference."""
        return cfg.teacher_mode in ("frozen", "sync", "ema", "trust") or cfg.kl_coef > 0

    def __init__(self, cfg, initial_copy, external=None):
        self.mode, self.cfg = cfg.teacher_mode, cfg
        self.model = {"frozen": initial_copy, "sync": initial_copy, "ema": initial_copy,
                      "trust": initial_copy, "external": external}.get(self.mode)
        if self.model is not None:
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def chunked(self, student, *batch):
        """A function (t0, t1) -> teacher logits (n, t1 - t0, V) for those response positions.

        The teacher's hidden states are computed once here; its LM head is applied per chunk
        when the loss asks, so the teacher's (n, T, V) logits never exist at once."""
        m = student if self.mode == "live" else self.model
        h = response_hidden(m, *batch)
        h_cur = response_hidden(student, *batch) if self.mode == "trust" else None

        def logits(t0: int, t1: int):
            with torch.no_grad():
                z = lm_head_logits(m, h[:, t0:t1])
                if h_cur is not None:
                    z = D.trust_region_logits(z, lm_head_logits(student, h_cur[:, t0:t1]),
                                              self.cfg.teacher_ema)
                return z
        return logits

    @torch.no_grad()
    def after_step(self, student, step: int):
        if self.mode in ("sync", "ema"):
            reshard(self.model, student)  # both sharded alike, parameter by parameter
        if self.mode == "sync" and self.cfg.teacher_sync > 0 and step % self.cfg.teacher_sync == 0:
            for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
                t.copy_(s)
        elif self.mode == "ema":
            D.ema_update(self.model.parameters(), student.parameters(), self.cfg.teacher_ema)

    @property
    def has_state(self):  # weights that neither the student nor the initial model can restore
        return self.mode in ("sync", "ema")


# ----------------------------------------------------------------------------------------
# Rollouts: prompts of this step -> sampled responses, rewards, advantages, teacher prompts
# ----------------------------------------------------------------------------------------

@dataclass
class Batch:
    ex: list                      # the Example behind each row
    ro: Rollouts                  # prompt / response ids and masks
    rewards: torch.Tensor         # (N,)
    adv: torch.Tensor             # (N,)
    texts: list                   # decoded responses
    loss_rows: torch.Tensor       # (N,) bool: rows that count in the loss (DAPO drops some)
    t_ids: torch.Tensor | None = None   # (N, Lt) teacher prompts (left-padded)
    t_mask: torch.Tensor | None = None
    teach_rows: torch.Tensor | None = None  # (N,) bool: rows with a privileged context
    route: dict | None = None     # algorithm-specific row masks (SRPO, PTD-PO)
    row_tokens: torch.Tensor | None = None  # (N,) loss tokens of each whole row, set by `cols`

    def rows(self, sl: slice) -> "Batch":
        def cut(x):
            if isinstance(x, torch.Tensor):
                return x[sl]
            if isinstance(x, Rollouts):
                return Rollouts(*(cut(getattr(x, f.name)) for f in dataclasses.fields(x)))
            if isinstance(x, dict):
                return {k: cut(v) for k, v in x.items()}
            return x[sl] if isinstance(x, list) else x
        return Batch(*(cut(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def cols(self, t0: int, t1: int) -> "Batch":
        """The same rows, response positions t0:t1 only (for chunked LM-head work). The rows'
        whole token counts are kept for per-sequence means (seq-mean-token-mean)."""
        ro = self.ro
        whole = self.row_tokens if self.row_tokens is not None else self.mask.sum(1)
        return dataclasses.replace(self, row_tokens=whole,
                                   ro=Rollouts(ro.prompt_ids, ro.prompt_mask, ro.resp_ids[:, t0:t1],
                                               ro.resp_mask[:, t0:t1], ro.truncated))

    @property
    def mask(self):  # (N, T) tokens in the loss
        return self.ro.resp_mask.bool() & self.loss_rows[:, None]


def step_examples(examples, step: int, cfg, ctx) -> list:
    """This rank's prompts for `step`: a function of (seed, step) only, so resume needs no
    data pointer. The stream is a fresh permutation per epoch; rank r takes every world-th."""
    P, n = cfg.prompts_per_step, len(examples)
    perms, out = {}, []
    for pos in range((step - 1) * P + ctx.rank, step * P, ctx.world):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
                cfg.seed * 7919 + epoch))
        out.append(examples[perms[epoch][pos % n]])
    return out


def _strip_thinking(text: str) -> str:  # SDPO remove_thinking_from_demonstration
    return text.split("</think>")[-1].strip() if "</think>" in text else text


def _sample(model, tok, exs, cfg, gen, ctx):
    tpl = data.templates(cfg.data)["student"]
    ids, mask = left_pad([data.prompt_ids(tok, data.render(tpl, e)) for e in exs], tok.pad_token_id)
    with gathered(model):
        ro = generate(model, ids.to(ctx.device), mask.to(ctx.device),
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      eos_id=-1 if cfg.ignore_eos else tok.eos_token_id,
                      pad_id=tok.pad_token_id, generator=gen, mode=cfg.generation)
    texts = tok.batch_decode(torch.where(ro.resp_mask.bool(), ro.resp_ids, tok.pad_token_id),
                             skip_special_tokens=True)
    rewards = torch.tensor([data.reward(t, e.answer) for t, e in zip(texts, exs)])
    if cfg.overlong_cache > 0:  # DAPO Eq. 13, on the response length
        rewards = rewards + grpo.overlong_penalty(ro.resp_mask.sum(1).cpu(), max_len=cfg.max_new_tokens,
                                                  cache_len=cfg.overlong_cache)
    return ro, texts, rewards


def collect(model, tok, examples, step, cfg, ctx, gen) -> Batch:
    """G rollouts of each of this rank's prompts, their rewards and group advantages.

    DAPO's dynamic sampling re-rolls the SAME prompts whose groups came back all-right or
    all-wrong (up to dapo_max_gen_batches rounds) instead of drawing new prompts as the paper
    does, so the data order stays a function of the step; groups still flat after that are
    kept out of the loss (loss_rows) but still run through the forward, so every rank does
    the same number of passes."""
    G = cfg.group_size
    exs = [e for e in step_examples(examples, step, cfg, ctx) for _ in range(G)]
    model.eval()
    ro, texts, rewards = _sample(model, tok, exs, cfg, gen, ctx)
    loss_rows = torch.ones(len(exs), dtype=torch.bool)
    if cfg.algo == "dapo":  # dynamic sampling: re-roll groups whose rewards are all equal
        for _ in range(cfg.dapo_max_gen_batches - 1):
            flat = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1)
            if not flat.any():
                break
            rows = flat.repeat_interleave(G).nonzero().squeeze(1).tolist()
            ro2, texts2, r2 = _sample(model, tok, [exs[i] for i in rows], cfg, gen, ctx)
            ro, texts, rewards = _replace_rows(ro, texts, rewards, rows, ro2, texts2, r2, tok)
        loss_rows = ~(rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).repeat_interleave(G)
    adv = grpo.group_advantages(rewards, G, scale=cfg.adv_scale)
    b = Batch(exs, ro, rewards.to(ctx.device), adv.to(ctx.device), texts, loss_rows.to(ctx.device))
    if cfg.teacher_mode != "none":
        add_teacher_prompts(b, tok, cfg, ctx)
    return b


def _replace_rows(ro, texts, rewards, rows, ro2, texts2, r2, tok):
    """DAPO re-roll: swap in the new samples of the re-rolled groups (response block re-padded)."""
    T = max(ro.resp_ids.shape[1], ro2.resp_ids.shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    resp, rmask = pad(ro.resp_ids, tok.pad_token_id), pad(ro.resp_mask, 0)
    idx = torch.tensor(rows, device=resp.device)
    resp[idx], rmask[idx] = pad(ro2.resp_ids, tok.pad_token_id), pad(ro2.resp_mask, 0)
    trunc = ro.truncated.clone()
    trunc[idx] = ro2.truncated
    rewards = rewards.clone()
    rewards[torch.tensor(rows)] = r2
    for j, i in enumerate(rows):
        texts[i] = texts2[j]
    return Rollouts(ro.prompt_ids, ro.prompt_mask, resp, rmask, trunc), texts, rewards


def add_teacher_prompts(b: Batch, tok, cfg, ctx):
    """The teacher's prompt per row: the student prompt plus the privileged context. Rows with
    no context (no correct sibling, no hint) get the plain prompt and teach_rows = False."""
    tpl = data.templates(cfg.data)
    G = cfg.group_size
    if cfg.context == "sibling":
        to_sdpo, sibling = D.srpo_route(b.rewards.cpu(), G, threshold=cfg.success_threshold)
        b.route = {"to_sdpo": to_sdpo.to(ctx.device)}
        sib = sibling.tolist()
        texts = [data.render(tpl["sibling"], e, sibling=_strip_thinking(b.texts[s])) if s >= 0
                 else data.render(tpl["student"], e) for e, s in zip(b.ex, sib)]
        has = sibling >= 0
    elif cfg.context == "none":  # e.g. OPD: an external teacher sees the student's own prompt
        has = torch.ones(len(b.ex), dtype=torch.bool)
        texts = [data.render(tpl["student"], e) for e in b.ex]
    else:
        has = torch.tensor([bool(getattr(e, cfg.context)) for e in b.ex])
        texts = [data.render(tpl[cfg.context] if h else tpl["student"], e)
                 for e, h in zip(b.ex, has.tolist())]
    ids, mask = left_pad([data.prompt_ids(tok, t) for t in texts], tok.pad_token_id)
    b.t_ids, b.t_mask, b.teach_rows = ids.to(ctx.device), mask.to(ctx.device), has.to(ctx.device)
    if cfg.algo == "ptdpo":
        acc = b.rewards.clamp(0, 1)
        b.route = {"ptd": D.ptd_mask(acc, G, b.teach_rows, tau=cfg.ptd_tau),
                   "ptd_group": D.ptd_mask(acc, G, b.teach_rows, tau=cfg.ptd_tau,
                                           all_trajectories=True)}


# ----------------------------------------------------------------------------------------
# Losses: one small function per algorithm, all built from grpo / rlsd / distill
# ----------------------------------------------------------------------------------------

@dataclass
class Norms:
    """Global denominators (all ranks, all micro-batches), so the gradient is split-invariant."""
    tokens: float          # loss tokens
    rows: float            # non-empty loss rows (seq-mean-token-mean)
    rows_x_len: float      # Dr. GRPO's constant: rows x max_new_tokens
    distill_tokens: float  # tokens of distilled rows (OPSD, SDPO, SRPO's SDPO branch, PTD)
    lam: float = 0.0       # RLSD lambda at this step
    w_mean: float | None = None  # SRPO: mean of exp(-beta H) over SDPO tokens


@dataclass
class Outputs:
    logits: torch.Tensor          # (n, T, V) student, with grad
    logp: torch.Tensor            # (n, T) student log-probs of the sampled tokens
    t_logits: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


def masked_mean(x, mask):
    """A metric: a detached 0-dim tensor, so the GPU is not synchronised once per chunk
    (train_step reads all metrics once per step)."""
    return torch.where(mask, x.detach().float(), 0.0).sum() / mask.sum().clamp(min=1)


def _pg(cfg, mb, out, adv, *, with_kl=True):
    """The clipped surrogate (+ k3 KL to the initial model when kl_coef > 0). On-policy with one
    optimizer step per batch, old_logp == logp.detach(), so the ratio is exactly 1."""
    per_tok, m = grpo.policy_loss(out.logp, out.logp.detach(), adv, clip_low=cfg.clip_low,
                                  clip_high=cfg.clip_high, dual_clip=cfg.dual_clip or None,
                                  mask=mb.mask)
    m = {k: v.detach() for k, v in m.items()}
    if cfg.kl_coef > 0 and with_kl:
        kl = grpo.kl_k3(out.logp, out.ref_logp)
        per_tok = per_tok + cfg.kl_coef * kl
        m["kl"] = masked_mean(kl, mb.mask)
    return per_tok, m


def loss_grpo(cfg, mb, out, norms):
    """GRPO, Dr. GRPO and DAPO differ only in configuration: advantage scale, aggregation,
    clip range, KL, dynamic sampling and overlong shaping."""
    per_tok, m = _pg(cfg, mb, out, mb.adv)
    norm = {"token-mean": norms.tokens, "seq-mean-token-mean": norms.rows,
            "seq-mean-token-sum-norm": norms.rows_x_len}[cfg.loss_agg]
    return grpo.aggregate(per_tok, mb.mask, mode=cfg.loss_agg, normalizer=norm,
                          row_tokens=mb.row_tokens), m


def loss_rlsd(cfg, mb, out, norms):
    t_logp = grpo.token_logprobs(out.t_logits, mb.ro.resp_ids, temperature=cfg.temperature)
    loss, m = rlsd_loss(out.logp, out.logp.detach(), mb.adv, t_logp, mb.mask, lam=norms.lam,
                        eps_w=cfg.eps_w, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip or None, normalizer=norms.tokens)
    return loss, {k: v.detach() for k, v in m.items()}


def loss_opd(cfg, mb, out, norms):
    t_logp = grpo.token_logprobs(out.t_logits, mb.ro.resp_ids, temperature=cfg.temperature)
    adv = cfg.opd_coef * D.opd_advantages(out.logp, t_logp)  # per-token advantage
    per_tok, m = _pg(cfg, mb, out, adv)
    m["opd_reverse_kl"] = masked_mean(-adv / max(cfg.opd_coef, 1e-12), mb.mask)
    return grpo.aggregate(per_tok, mb.mask, normalizer=norms.tokens), m


def loss_opsd(cfg, mb, out, norms):
    mask = mb.mask & mb.teach_rows[:, None]
    div = D.distill_per_token(out.logits, out.t_logits, beta=cfg.beta, top_k=cfg.top_k or None,
                              token_clip=cfg.token_clip or None, temperature=cfg.temperature,
                              support="teacher")  # OPSD's top_k_loss uses the teacher's top-k
    return (grpo.aggregate(div, mask, normalizer=norms.distill_tokens),
            {"distill": masked_mean(div, mask)})


def _sdpo_tokens(cfg, out):
    V = out.logits.shape[-1]
    return D.sdpo_per_token(out.logits, out.t_logits, out.logp, out.logp.detach(), beta=cfg.beta,
                            top_k=min(cfg.top_k, V) if cfg.top_k else None,
                            is_clip=cfg.is_clip, temperature=cfg.temperature)


def loss_sdpo(cfg, mb, out, norms):
    mask = mb.mask & mb.teach_rows[:, None]
    per_tok = _sdpo_tokens(cfg, out)
    return (grpo.aggregate(per_tok, mask, normalizer=norms.distill_tokens),
            {"distill": masked_mean(per_tok, mask)})


def loss_srpo(cfg, mb, out, norms):
    to_sdpo = mb.route["to_sdpo"]
    pg, m = _pg(cfg, mb, out, mb.adv)
    sd = _sdpo_tokens(cfg, out)
    sd_mask = mb.mask & to_sdpo[:, None]
    h = grpo.entropy(out.t_logits, temperature=cfg.temperature)
    w = D.entropy_weights(h, sd_mask, beta=cfg.srpo_beta, normalizer=norms.w_mean)
    m["distill"] = masked_mean(sd, sd_mask)
    return D.srpo_loss(pg, sd, w, to_sdpo, mb.mask, normalizer=norms.tokens), m


def loss_ptdpo(cfg, mb, out, norms):
    pg, m = _pg(cfg, mb, out, mb.adv, with_kl=False)  # ptdpo_loss adds the KL, off PTD groups
    kl = grpo.kl_k3(out.logp, out.ref_logp)
    V = out.logits.shape[-1]
    ptd = D.ptd_topk_jsd(out.logits.float() / cfg.temperature, out.t_logits.float() / cfg.temperature,
                         k=min(cfg.top_k, V))
    rows = mb.route["ptd"]
    m["kl"] = masked_mean(kl, mb.mask & ~mb.route["ptd_group"][:, None])
    m["distill"] = masked_mean(ptd, mb.mask & rows[:, None])
    return D.ptdpo_loss(pg, kl, ptd, mb.mask, rows, mb.route["ptd_group"], ptd_coef=cfg.ptd_coef,
                        kl_coef=cfg.kl_coef, normalizer=norms.tokens,
                        ptd_normalizer=norms.distill_tokens), m


LOSSES = {"grpo": loss_grpo, "dr_grpo": loss_grpo, "dapo": loss_grpo, "rlsd": loss_rlsd,
          "opd": loss_opd, "opsd": loss_opsd, "sdpo": loss_sdpo, "srpo": loss_srpo,
          "ptdpo": loss_ptdpo}


def distill_rows(cfg, b: Batch):
    """Rows whose tokens the distillation term averages over (None: no such term)."""
    if cfg.algo in ("opsd", "sdpo"):
        return b.teach_rows
    if cfg.algo == "srpo":
        return b.route["to_sdpo"]
    if cfg.algo == "ptdpo":
        return b.route["ptd"]
    return None


# ----------------------------------------------------------------------------------------
# The update: micro-batches -> one optimizer step -> teacher update
# ----------------------------------------------------------------------------------------

# logits per LM-head chunk: 2**24 values are 64 MiB in float32; the divergences make a few
# float32 copies of a chunk, so this bounds their memory at a few hundred MiB for any vocabulary.
# Measured on CPU: 2**23 gave a much HIGHER peak RSS (glibc keeps 32 MiB blocks on its heap,
# which fragments, while 64 MiB blocks are mmapped and returned on free).
# A chunk also has a fixed cost: about 300 tensor ops for forward, recompute and backward (GRPO
# 281, RLSD 367, SDPO 306: `python bench.py --algos grpo,rlsd,sdpo --ops-per-chunk`). On a
# GPU each is a kernel launch, which dominates small chunks: on an H100 with 2**24 (Qwen3-0.6B
# shape, 16 rows), RLSD's 344 chunks per step made its fwd+bwd 2.1 s slower than GRPO's
# then-unchunked one. So GPU chunks are 8x larger (512 MiB in float32); that value is
# reasoned, not yet timed.
LOGIT_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**27}


def column_chunks(b: Batch, model, cfg) -> list:
    """Response-position ranges for LM-head work: each chunk's logits hold about
    LOGIT_CHUNK_ELEMENTS[device] values (--logit-chunk sets positions per chunk, -1 takes all
    at once). Every loss here is a sum over positions divided by a global count (the
    per-sequence mean divides by the whole row's length, `Batch.row_tokens`), so chunks add
    up exactly."""
    T = b.ro.resp_ids.shape[1]
    if cfg.logit_chunk < 0:
        return [(0, T)]
    head = model.get_output_embeddings().weight
    budget = LOGIT_CHUNK_ELEMENTS.get(head.device.type, LOGIT_CHUNK_ELEMENTS["cpu"])
    step = cfg.logit_chunk or max(1, budget // max(1, len(b.ex) * head.shape[0]))
    return [(t, min(t + step, T)) for t in range(0, T, step)]


def micro_batches(b: Batch, cfg):
    n = len(b.ex)
    size = cfg.micro_batch_size or n
    return [b.rows(slice(i, i + size)) for i in range(0, n, size)]


def global_norms(b: Batch, cfg, ctx, step: int) -> Norms:
    mask = b.mask
    rows = distill_rows(cfg, b)
    dmask = mask & rows[:, None] if rows is not None else mask[:, :0]
    return Norms(tokens=ctx.sum(mask.sum()).item(), rows=ctx.sum((mask.sum(1) > 0).sum()).item(),
                 rows_x_len=ctx.sum(len(b.ex) * cfg.max_new_tokens).item(),
                 distill_tokens=ctx.sum(dmask.sum()).item(),
                 lam=lambda_schedule(step, lam0=cfg.lam0, warmup=cfg.lam_warmup,
                                     decay=cfg.lam_decay) if cfg.algo == "rlsd" else 0.0)


@torch.no_grad()
def srpo_weight_mean(model, teacher, mbs, cfg, ctx) -> float:
    """First pass of SRPO's two-pass normaliser: the mean of exp(-beta H_teacher) over every
    SDPO token of the batch (all ranks), so the weights have mean 1 over the whole batch."""
    total, count = 0.0, 0.0
    for mb in mbs:
        t_logits = teacher.chunked(model, mb.t_ids, mb.t_mask, mb.ro.resp_ids, mb.ro.resp_mask)
        for t0, t1 in column_chunks(mb, model, cfg):
            h = grpo.entropy(t_logits(t0, t1), temperature=cfg.temperature).double()
            m = mb.cols(t0, t1).mask & mb.route["to_sdpo"][:, None]
            total, count = total + torch.exp(-cfg.srpo_beta * h)[m].sum().item(), count + m.sum().item()
    total, count = ctx.sum(total).item(), ctx.sum(count).item()
    return total / count if count else 1.0
