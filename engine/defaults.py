"""Each algorithm's paper settings, the toy task's scale, and which algorithms read which flag.

`PAPER_DEFAULTS` are the released code's settings, checked against it in
docs/fidelity.md and tested in tests/test_config.py; `TOY_DEFAULTS` rescale the
sizes (learning rate, batch, lengths, steps) to the embedded ~0.3M-parameter task and keep
every algorithmic constant; `USED_BY` makes a flag given to an algorithm that ignores it a
config error. config.py layers them under the --preset recipe and the command line.
"""
from engine import prompts

# Paper settings per algorithm (docs/paper-defaults.md, docs/fidelity.md, each module's docstring).
NO_THINKING, THINKING = '{"enable_thinking": false}', '{"enable_thinking": true}'  # Qwen3
PAPER_DEFAULTS = {
    "sft": dict(lr=1e-5, context="none", lr_warmup_steps=50),
    # DeepSeekMath: std-normalised, per-sequence mean, k3 KL 0.04, symmetric clip
    "grpo": dict(loss_agg="seq-mean-token-mean", kl_coef=0.04, clip_high=0.2, context="none"),
    # Dr. GRPO: no std, token sum / constant, no KL
    # (oat qwen2.5-math-7b.sh: 128 prompts x 8, max length 3000, 8 updates per rollout batch)
    "dr_grpo": dict(adv_scale="none", loss_agg="seq-mean-token-sum-norm", clip_high=0.2,
                    context="none", prompts_per_step=128, mini_batch_size=16, max_new_tokens=3000),
    # DAPO (verl recipe): clip-higher, token-mean, +-1 reward, dynamic sampling on accuracy,
    # overlong shaping (4096 of 20480), G 16, 512 prompts, up to 10 generation rounds, weight
    # decay 0.1, warm-up 10, dual clip 10, mini-batches of 32 prompts (16 updates per batch)
    "dapo": dict(max_new_tokens=20480, overlong_cache=4096, context="none", group_size=16,
                 prompts_per_step=512, mini_batch_size=32, dapo_max_gen_batches=10, weight_decay=0.1,
                 lr_warmup_steps=10, dual_clip=10.0, reward="dapo"),
    # GSPO (Zheng et al. 2025): one ratio per sequence, clipped to [1 - 3e-4, 1 + 4e-4] (its
    # Sec. 5.1; verl's gspo forces the per-sequence token mean and has no dual clip); the ratio
    # only acts with several updates per batch: 4 mini-batches per rollout batch, as the
    # paper's setup splits each batch (as recalled: only the clip range was checked)
    "gspo": dict(clip_low=3e-4, clip_high=4e-4, dual_clip=0.0, loss_agg="seq-mean-token-mean",
                 kl_coef=0.0, context="none", mini_batch_size=8),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, the whole completion one action (a
    # token sum per sequence; here / the length limit, a constant), k = 4 samples, no clip
    # in the paper (on-policy the PPO clip never acts). Its KL penalty in the reward is not
    # implemented: --kl-coef adds the k3 KL to the loss instead
    "rloo": dict(adv_scale="loo", loss_agg="seq-mean-token-sum-norm", kl_coef=0.0,
                 clip_high=0.2, context="none", group_size=4),
    # Thinking Machines OPD: external teacher, sampled-token reverse KL as the advantage;
    # 1024 groups of 4 (its lr 1e-4 is LoRA's, not set here)
    "opd": dict(teacher_mode="external", group_size=4, context="none", prompts_per_step=1024),
    # OPSD v3: 1 rollout, T 1.1 with top-p 0.95 / top-k 20, forward KL, pointwise clip 0.05,
    # (lr 5e-6, grad-norm 0.1 and 100 steps come from a third-party copy of the v3
    # run_opsd_1b.sh; the official repository's first release has lr 2e-4 and beta 0.5)
    # frozen teacher, lr 5e-6; HF Trainer defaults: linear decay to 0, no weight decay
    "opsd": dict(group_size=1, temperature=1.1, rollout_top_p=0.95, rollout_top_k=20,
                 beta=0.0, top_k=0, token_clip=0.05, lr_schedule="linear", weight_decay=0.0,
                 distill_agg="seq-mean",
                 student_template=prompts.OPSD_STUDENT, chat_template_kwargs=NO_THINKING,
                 teacher_chat_template_kwargs=THINKING,
                 teacher_mode="frozen", context="solution", lr=5e-6, max_grad_norm=0.1,
                 max_new_tokens=1024, prompts_per_step=32, steps=100),
    # SDPO (no rich feedback): JSD 0.5, top-100 + tail, EMA 0.05, lr 1e-5 with warm-up 10
    "sdpo": dict(beta=0.5, top_k=100, teacher_mode="ema", teacher_ema=0.05, context="sibling",
                 adv_scale="none", lr=1e-5, lr_warmup_steps=10, max_new_tokens=8192,
                 prompts_per_step=32, chat_template_kwargs=NO_THINKING,
                 max_teacher_prompt_tokens=10240, distill_agg="seq-mean-all-rows",
                 max_prompt_tokens=2048, long_prompts="skip"),
    # SRPO: Dr. GRPO advantages, SDPO branch as above, lr 5e-6 with warm-up 10
    "srpo": dict(beta=0.5, top_k=100, teacher_mode="ema", teacher_ema=0.05, context="sibling",
                 adv_scale="none", lr=5e-6, lr_warmup_steps=10, max_new_tokens=8192,
                 prompts_per_step=32, chat_template_kwargs=NO_THINKING,
                 max_teacher_prompt_tokens=10240),
    # Contrastive self-distillation (arXiv 2609.21561): teachers shown a correct and a wrong
    # sibling, as SDPO picks its demonstration; balanced 1/2, 1/2. The paper's optimisation
    # settings are not at hand here: SDPO's (its EMA teacher, learning rate, lengths)
    "csd": dict(teacher_mode="ema", teacher_ema=0.05, context="sibling", adv_scale="none",
                lr=1e-5, lr_warmup_steps=10, max_new_tokens=8192, prompts_per_step=32,
                chat_template_kwargs=NO_THINKING, max_teacher_prompt_tokens=10240,
                max_prompt_tokens=2048, long_prompts="skip"),
    # PTD-PO: frozen reference teacher with the hint, k3 KL 0.01, clip high 0.3, Top-100 JSD,
    # rollouts at top-p 0.99 (EasyR1 config_grpo.yaml)
    "ptdpo": dict(teacher_mode="frozen", context="hint", kl_coef=0.01, clip_high=0.3,
                  top_k=100, prompts_per_step=384, mini_batch_size=128, rollout_top_p=0.99,
                  distill_agg="micro-batch-mean"),
    # RLSD: frozen teacher re-synced every 10 steps, lambda 0.5 -> 0 over 50 steps; the
    # released code's student prompt and its 0.9 acc + 0.1 format reward (the paper: binary)
    "rlsd": dict(teacher_mode="sync", context="answer", max_new_tokens=4096, prompts_per_step=256,
                 student_template=prompts.RLSD_STUDENT, reward="rlsd_format"),
}
# The toy task is ~1e4 times smaller than the papers' settings: learning rate, batch and
# lengths are scaled to it; every algorithmic constant above is kept.
# The learning rate decays (cosine): at 200x the papers' rate, a constant one left the greedy
# accuracy drifting at the end (one run each, 500 test problems, from the earlier 1300-step
# warm start's 32.8%: RLSD 49.4% and GRPO 39.0% with a constant rate,
# `python train.py [--algo grpo] --lr-schedule constant`; 44.4% and 43.8% with the decay).
TOY_CONTEXT = 256  # positions of the text tasks' toy Qwen3 (models.build_toy_model)
TOY_DEFAULTS = dict(prompts_per_step=16, max_new_tokens=40, lr=2e-4, steps=150,
                    eval_every=50, overlong_cache=0, mini_batch_size=0, lr_schedule="cosine")
TOY_ALGO_DEFAULTS = {"sft": dict(lr=3e-3, prompts_per_step=64, steps=2400, eval_every=300,
                                 lr_schedule="constant"),
                     "opsd": dict(prompts_per_step=32, max_grad_norm=1.0),
                     "dapo": dict(dapo_max_gen_batches=3),
                     "gspo": dict(mini_batch_size=4)}  # 4 updates of 4 prompts: the ratio acts

# Algorithm-specific flags and the algorithms that read them: giving one to another algorithm
# is a config error, not a silent no-op.
USED_BY = {
    "kl_coef": ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "opd", "srpo", "ptdpo"),
    "kl_direction": ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "opd", "srpo", "ptdpo"),
    "adv_scale": ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "rlsd", "srpo", "ptdpo"),
    "loss_agg": ("grpo", "dr_grpo", "dapo", "gspo", "rloo"),
    "overlong_cache": ("dapo",), "dapo_max_gen_batches": ("dapo",),
    "lam0": ("rlsd",), "lam_decay": ("rlsd",), "lam_warmup": ("rlsd",), "eps_w": ("rlsd",),
    "beta": ("opsd", "sdpo", "srpo"), "token_clip": ("opsd",), "is_clip": ("sdpo", "srpo"),
    "top_k": ("opsd", "sdpo", "srpo", "ptdpo"), "distill_agg": ("opsd", "sdpo", "ptdpo"), "success_threshold": ("sdpo", "srpo", "csd"),
    "csd_balance": ("csd",), "rollout_refresh": ("opd", "opsd"),
    "srpo_beta": ("srpo",), "ptd_coef": ("ptdpo",), "ptd_tau": ("ptdpo",),
    "ptd_divergence": ("ptdpo",), "opd_coef": ("opd",),
    "teacher": ("opd",),  # with --teacher-mode external (the default); frozen: a self-teacher
}
