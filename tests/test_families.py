"""Every common model family through the chunked LM head: logits post-processed after the head
(Gemma 2/3 soft-capping, Cohere's logit scale, Granite's divisor) are applied inside each chunk,
exactly as the family's own forward does; anything else is refused at load."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import grpo
from conftest import chunk_logits
from engine.teachers import check_logits, response_hidden, response_logits

FAMILIES = {  # model_type: the post-processing its config switches on (tiny shapes)
    "gemma2": dict(final_logit_softcapping=2.0),
    "gemma3_text": dict(final_logit_softcapping=2.0),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(logit_scale=3.0),
    "granite": dict(logits_scaling=4.0),
    "qwen3": {},
    "llama": {},
    "phi": {},  # an LM head with a bias
}


def tiny(model_type, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, max_position_embeddings=128, eos_token_id=1,
                               bos_token_id=2, pad_token_id=0,
                               **{**FAMILIES.get(model_type, {}), **kw})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # large logits, so that a cap or a scale changes them visibly
        model.get_output_embeddings().weight.mul_(20.0)
        if model.get_output_embeddings().bias is not None:  # a bias that matters
            model.get_output_embeddings().bias.normal_(0.0, 5.0)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    prompt, resp = torch.randint(3, 64, (2, 4), generator=g), torch.randint(3, 64, (2, 5), generator=g)
    pmask, rmask = torch.ones_like(prompt), torch.ones_like(resp)
    pmask[1, :2] = 0
    return prompt, pmask, resp, rmask


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_chunked_head_equals_the_full_forward(model_type):
    model = tiny(model_type)
    x = _batch()
    full = response_logits(model, *x)
    ours = chunk_logits(model, *x, chunks=[(0, 2), (2, 4), (4, 6)])
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-4)
    check_logits(model, model_type)  # accepted
    if model_type == "phi":
        assert model.get_output_embeddings().bias is not None
    # the logged entropy is the entropy of the distribution that is sampled from
    torch.testing.assert_close(grpo.entropy(ours), grpo.entropy(full), atol=1e-4, rtol=1e-4)
    if FAMILIES[model_type]:  # the post-processing matters: the bare head would be wrong
        raw = torch.nn.functional.linear(response_hidden(model, *x),
                                         model.get_output_embeddings().weight)
        assert (raw - full).abs().max() > 0.1


def test_capped_entropy_is_not_the_uncapped_one():
    """The issue's report: a tiny Gemma 2 logged the entropy of the uncapped logits (near 0)
    while sampling from the capped ones (near ln V); now both are the capped one."""
    model = tiny("gemma2", final_logit_softcapping=0.5)
    x = _batch()
    h = grpo.entropy(chunk_logits(model, *x, chunks=[(0, 5)]))
    assert h.mean() > 0.9 * torch.log(torch.tensor(64.0))


def test_unknown_post_processing_is_refused():
    class Shifted(torch.nn.Module):  # a family that adds something after the head
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = out.logits * 2.0
            return out

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()
    with pytest.raises(SystemExit, match="post-processes them"):
        check_logits(Shifted(tiny("qwen3")), "--model shifted")
