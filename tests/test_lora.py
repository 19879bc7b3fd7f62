"""LoRA (lora.py): only adapters train, the adapters-off base is the frozen teacher and the
reference, checkpoints are PEFT adapter directories that load, merge and resume exactly."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from engine import lora
import train
from engine.rollout import load_model
from engine.toy.models import build_toy_model, build_toy_tokenizer
from conftest import chunk_logits
from tests.conftest import warm_start_dir
from tests.test_train import TINY, _train_rows

peft = pytest.importorskip("peft")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt, resp = torch.randint(3, 31, (3, 5), generator=g), torch.randint(3, 31, (3, 6), generator=g)
    pmask, rmask = torch.ones_like(prompt), torch.ones_like(resp)
    pmask[0, :2], rmask[2, 4:] = 0, 0
    return prompt, pmask, resp, rmask


def _adapted(seed=0):
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, seed=seed)
    base = build_toy_model(tok, seed=seed)
    model = lora.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=lora.LORA_TARGETS)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    return model, base


def test_only_adapters_are_trainable():
    model, _ = _adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 3 * 7 * 2  # 3 layers x q k v o gate up down x (A, B)


def test_base_view_is_the_base_model():
    """The frozen teacher / reference: the student with adapters off gives the base model's
    logits exactly, while the adapted student differs."""
    model, base = _adapted()
    x = _inputs()
    want = chunk_logits(base, *x, chunks=[(0, 6)])
    assert torch.equal(chunk_logits(lora.BaseView(model), *x, chunks=[(0, 6)]), want)
    assert not torch.allclose(chunk_logits(model, *x, chunks=[(0, 6)]), want, atol=1e-3)
    assert any(p.requires_grad for p in model.parameters())  # the view changed nothing


def test_bad_targets_name_the_problem():
    tok = build_toy_tokenizer()
    with pytest.raises(SystemExit, match="no linear layer of that name"):
        lora.add_lora(build_toy_model(tok), rank=2, alpha=4, dropout=0.0, targets="qkv")
    with pytest.raises(SystemExit, match="LM head"):
        lora.add_lora(build_toy_model(tok), rank=2, alpha=4, dropout=0.0, targets="lm_head")


def test_adapter_names_round_trip():
    model, _ = _adapted()
    state = model.state_dict()
    saved = lora.adapter_state(state)
    assert saved and all(".default." not in k for k in saved)
    assert set(lora.model_state(saved)) == {k for k in state if ".lora_" in k}


LORA = ["--algo", "opsd", "--group-size", "1", "--lora-rank", "4", "--lr", "1e-2"]


def _run(out, cache, *args):
    train.main(TINY + ["--cache-dir", cache, "--out", str(out), *args])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lora_run_saves_adapters_that_load_and_merge(tmp_path, cache):
    """Only the adapters are trained (the base weights stay bit-identical) and saved; the
    checkpoint loads with PeftModel.from_pretrained, merges, and loads in eval.py's path."""
    from transformers import AutoModelForCausalLM
    rows = _run(tmp_path / "r", cache, *LORA)
    assert rows[-1]["step"] == 2
    ck = tmp_path / "r" / "checkpoint-000002"
    assert not (ck / "model.safetensors").exists()  # adapters only
    saved = load_file(str(ck / lora.ADAPTER_WEIGHTS))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # trained
    base_dir = warm_start_dir(cache)
    with open(ck / lora.ADAPTER_CONFIG) as f:
        assert json.load(f)["base_model_name_or_path"] == base_dir
    x = _inputs()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    want_base = chunk_logits(base, *x, chunks=[(0, 6)])
    adapted = peft.PeftModel.from_pretrained(base, str(ck))
    unmerged = chunk_logits(adapted, *x, chunks=[(0, 6)])
    assert not torch.allclose(unmerged, want_base, atol=1e-4)
    merged, _ = load_model(str(ck))  # the path eval.py takes: base + adapters, merged
    torch.testing.assert_close(chunk_logits(merged, *x, chunks=[(0, 6)]), unmerged, atol=1e-5,
                               rtol=1e-5)
    assert not lora.is_lora(merged)


def test_lora_checkpoint_resumes_exactly(tmp_path, cache):
    args = [*LORA, "--steps", "4", "--lr-schedule", "constant"]
    full = _run(tmp_path / "a", cache, *args)
    part = tmp_path / "b"
    _run(part, cache, *LORA, "--lr-schedule", "constant")  # stops after step 2
    resumed = _run(part, cache, *args, "--resume")
    assert _train_rows(resumed) == _train_rows(full)
    a = load_file(str(tmp_path / "a" / "checkpoint-000004" / lora.ADAPTER_WEIGHTS))
    b = load_file(str(part / "checkpoint-000004" / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_lora_setting(tmp_path, cache):
    _run(tmp_path / "c", cache, *LORA)
    with pytest.raises(SystemExit, match="lora-rank"):
        _run(tmp_path / "c", cache, "--algo", "opsd", "--group-size", "1", "--lora-rank", "8",
             "--resume")
