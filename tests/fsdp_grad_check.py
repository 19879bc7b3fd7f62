"""Run by test_train.py under `torchrun --nproc_per_node=2`: the chunked LM-head loss under
FSDP2 (with --gradient-checkpointing: and each decoder layer recomputed in backward; with
--lora: LoRA adapters, the only weights with a gradient) must give the same gradient as the
full-logits loss in one process. Rows 2 and 3 repeat the prompts of rows 0 and 1, so each
rank's two rows share one prompt forward (teachers.shared_prompt_forward; not under
checkpointing), checked against the one-process forward of every row's own prompt."""
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from engine import rollout  # noqa: E402
from engine.distributed import Dist, shard  # noqa: E402
from engine.rollout import checkpoint_layers
from engine.toy.models import build_toy_model, build_toy_tokenizer  # noqa: E402
from engine.teachers import lm_head_logits, response_hidden, response_logits  # noqa: E402

dist.init_process_group("gloo")
ctx = Dist(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
tok = build_toy_tokenizer()
model = build_toy_model(tok, seed=0)
if "--lora" in sys.argv:
    from engine.lora import LORA_TARGETS, add_lora
    model = add_lora(model, rank=4, alpha=8, dropout=0.0, targets=LORA_TARGETS)
    with torch.no_grad():  # B = 0 at init would hide a wrong gradient of A
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
reference = copy.deepcopy(model)
checkpointing = "--gradient-checkpointing" in sys.argv
calls = []  # the positions of each forward call inside the first decoder layer
model.get_decoder().layers[0].self_attn.register_forward_pre_hook(
    lambda m, args, kw: calls.append((args[0] if args else kw["hidden_states"]).shape[1]),
    with_kwargs=True)
if checkpointing:
    checkpoint_layers(model)
    model.train()
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, len(tok), (4, 5), generator=g)
pmask = torch.ones_like(prompt)
pmask[1, :2] = 0
prompt[2:], pmask[2:] = prompt[:2], pmask[:2]  # rank r holds rows r and r + 2: one prompt
resp = torch.randint(3, len(tok), (4, 7), generator=g)
rmask = torch.ones_like(resp)
rmask[2, 5:] = 0
norm = rmask.sum()

shard(model, ctx, torch.float32)
rows = slice(ctx.rank, None, ctx.world)
h = response_hidden(model, prompt[rows], pmask[rows], resp[rows], rmask[rows])


def nll(h_chunk, t0, t1):
    logp = grpo.token_logprobs(lm_head_logits(model, h_chunk), resp[rows][:, t0:t1])
    return grpo.aggregate(-logp, rmask[rows][:, t0:t1], normalizer=norm)


loss = sum(torch.utils.checkpoint.checkpoint(nll, h[:, t0:t0 + 3], t0, min(t0 + 3, 7),
                                             use_reentrant=False) for t0 in range(0, 7, 3))
(loss * ctx.world).backward()
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}

rollout.SHARE_PROMPTS = False  # the reference: each row's own prompt forward
logits = response_logits(reference, prompt, pmask, resp, rmask)
grpo.aggregate(-grpo.token_logprobs(logits, resp), rmask, normalizer=norm).backward()
for n, p in reference.named_parameters():
    if p.requires_grad:
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    else:
        assert p.grad is None, n
# shared: the prompt (5 positions), then the responses (7); checkpointed: prompt + response
# in one forward, recomputed in backward
assert calls == ([12, 12] if checkpointing else [5, 7]), calls
print(f"rank {ctx.rank}: {len(grads)} gradients match", flush=True)
dist.destroy_process_group()
