"""Recipes (presets.py, recipes/*.toml) and the dry run (dryrun.py): every preset loads, names
the source of every value, passes --dry-run, and runs two steps on the toy model; the memory
formula is checked against tensors measured on CPU."""
import json
import os
import re

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from engine import config, dryrun, presets
import train
from engine.rollout import checkpoint_layers
from engine.toy.models import build_toy_model, build_toy_tokenizer
from tests.test_train import TINY

NAMES = presets.names()
TEXT = [n for n in NAMES if presets.load(n, config.DEFAULTS)[0].get("needs") not in ("vlm", "omni")]


def test_the_papers_settings_are_all_there():
    want = {"rlsd-qwen3-vl-8b", "grpo-qwen3-vl-8b", "opsd-qwen3-vl-8b", "sdpo-qwen3-vl-8b",
            "opsd-qwen3-1.7b", "opsd-qwen3-4b", "opsd-qwen3-8b", "sdpo-qwen3-8b", "srpo-qwen3-8b",
            "ptdpo-qwen3-vl-2b", "ptdpo-qwen3-vl-4b", "ptdpo-qwen3-vl-8b", "omniopsd-qwen3-vl-8b",
            "omniopsd-qwen2.5-omni-7b"}
    assert want <= set(NAMES)
    assert {"opsd-qwen3-1.7b", "opsd-qwen3-4b", "opsd-qwen3-8b", "sdpo-qwen3-8b",
            "srpo-qwen3-8b"} <= set(TEXT)


@pytest.mark.parametrize("name", NAMES)
def test_every_value_names_its_source(name):
    """Each `key = value` line of a recipe ends in a comment, and the file is named after the
    preset; the model in [about] is the one trained and ships its config.json."""
    with open(os.path.join(presets.RECIPES, name + ".toml")) as f:
        lines = [ln for ln in f.read().splitlines() if re.match(r"^\w+\s*=", ln)]
    assert lines
    for ln in lines:
        assert re.search(r"\s#\s*\S", ln.split("=", 1)[1]), f"{name}: no source on: {ln}"
    about, values = presets.load(name, config.DEFAULTS)
    assert values["model"] == about["model"] and values["algo"] in config.ALGOS
    assert presets.model_config_dir(about["model"]), about["model"]
    if about.get("needs") == "lora":
        assert values["lora_rank"] > 0


def test_flags_override_the_preset_and_the_preset_overrides_paper_defaults():
    cfg = config.parse_config(["--preset", "opsd-qwen3-1.7b", "--lr", "1e-4", "--data", __file__])
    assert cfg.lr == 1e-4 and cfg.lora_rank == 64 and cfg.max_grad_norm == 0.1
    assert cfg.student_template == config.PAPER_DEFAULTS["opsd"]["student_template"]  # left out
    cfg = config.parse_config(["--preset", "sdpo-qwen3-8b", "--dry-run"])
    assert cfg.lr == 1e-5 and cfg.model == "Qwen/Qwen3-8B" and cfg.preset == "sdpo-qwen3-8b"


def test_bad_presets_are_named(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="no such recipe"):
        config.parse_config(["--preset", "nope"])
    monkeypatch.setattr(presets, "RECIPES", str(tmp_path))
    (tmp_path / "typo.toml").write_text('[config]\nlearning_rate = 1e-6  # x\n')
    with pytest.raises(SystemExit, match=r"typo.toml: \[config\] learning_rate is not an option"):
        config.parse_config(["--preset", "typo"])
    (tmp_path / "kind.toml").write_text('[config]\nsteps = "ten"  # x\n')
    with pytest.raises(SystemExit, match="steps = 'ten' should be int"):
        config.parse_config(["--preset", "kind"])


def test_a_real_model_preset_needs_data():
    with pytest.raises(SystemExit, match="give --data FILE"):
        config.parse_config(["--preset", "sdpo-qwen3-8b"])
    cfg = config.parse_config(["--preset", "rlsd-qwen3-vl-8b", "--data", __file__])
    assert cfg.model == "Qwen/Qwen3-VL-8B-Instruct" and cfg.teacher_sync == 10


def test_list_presets(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(["--list-presets"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert "Qwen/Qwen3-VL-8B-Instruct" in out and "GPUs" in out


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_passes_the_dry_run(name, capsys):
    train.main(["--preset", name, "--dry-run"])
    out = capsys.readouterr().out
    assert "dry run OK" in out and "peak" in out


def test_dry_run_validates_the_data(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1", "answer": "2", "solution": "1+1=2"}\n')
    train.main(["--preset", "opsd-qwen3-1.7b", "--dry-run", "--data", str(good)])
    assert "good.jsonl: 1 rows" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2", "solution": "1+1=2"}\n{"prompt": "2+2"}\n')
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "opsd-qwen3-1.7b", "--dry-run", "--data", str(bad)])
    assert e.value.code == 2
    assert "bad.jsonl" in capsys.readouterr().err


# published parameter counts (Hugging Face model cards), billions: the shipped configs are right
PUBLISHED = {"Qwen/Qwen3-0.6B": 0.6, "Qwen/Qwen3-1.7B": 1.7, "Qwen/Qwen3-4B": 4.0, "Qwen/Qwen3-8B": 8.2,
             "Qwen/Qwen3-VL-2B-Thinking": 2.1, "Qwen/Qwen3-VL-4B-Thinking": 4.4,
             "Qwen/Qwen3-VL-8B-Thinking": 8.8, "Qwen/Qwen3-VL-8B-Instruct": 8.8}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_shipped_configs_have_the_published_size(model):
    cfg = config.parse_config(["--model", model, "--dry-run"])
    s = dryrun.shapes(dryrun.meta_model(dryrun.model_config(cfg)[0]), cfg)
    assert s["total"] / 1e9 == pytest.approx(PUBLISHED[model], abs=0.06)


@pytest.mark.parametrize("name", TEXT + ["ptdpo-qwen3-vl-4b"])
def test_every_text_preset_runs_two_steps_on_the_toy(tmp_path, cache, name):
    """All of a recipe's options together (LoRA, mini-batches, micro-batches, sampled in
    passes, checkpointing, bf16...), with the model swapped for the toy and the batch shrunk."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--preset", name, "--model", "toy", "--cache-dir", cache, "--out", out,
                       "--mini-batch-size", "2", "--micro-batch-size", "3",
                       "--rollout-micro-batch", "3", "--eval-data", ""])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(r["updates"] == 2 for r in rows)
    assert all(r["loss"] == r["loss"] for r in rows)


# ----------------------------------------------------------------------------------------
# The memory formula against measured tensors (CPU, float32)
# ----------------------------------------------------------------------------------------

def _qwen3(H, I, L, heads, kv, hd, V=64):
    return Qwen3ForCausalLM(Qwen3Config(
        hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=hd, vocab_size=V, max_position_embeddings=1024))


def _cfg(**kw):
    return config.parse_config(["--dry-run", "--dtype", "float32", "--algo", "sft",
                                *[a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]])


def _saved_bytes(model, ids):
    """Bytes of the tensors autograd keeps for backward during the body's forward (each
    storage once, parameters excluded)."""
    seen, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, use_cache=False)
    return sum(v for k, v in seen.items() if k not in params)


SHAPES = [(64, 192, 2, 4, 2, 16), (128, 512, 3, 8, 2, 16), (256, 768, 2, 8, 8, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_measured(shape, checkpointing):
    model = _qwen3(*shape).train()
    if checkpointing:
        checkpoint_layers(model)
    m, S = 2, 96
    measured = _saved_bytes(model, torch.randint(0, 64, (m, S)))
    if checkpointing:  # the recomputed layer is not held during the forward
        measured += _saved_bytes(_qwen3(*shape[:2], 1, *shape[3:]).train(),
                                 torch.randint(0, 64, (m, S)))
    s = dryrun.shapes(model, _cfg())
    cfg = _cfg(max_new_tokens=S - 1, max_prompt_tokens=1, prompts_per_step=m, group_size=1,
               gradient_checkpointing=checkpointing)
    est = dryrun.estimate(s, cfg, world=1)["activations"]
    assert est == pytest.approx(measured, rel=0.10 if not checkpointing else 0.35)


def test_static_memory_is_exact_after_an_optimizer_step():
    """Weights, gradients and AdamW state of the toy model (float32, one process), and the
    LoRA trained-parameter count, equal the formula to the byte."""
    tok = build_toy_tokenizer()
    model = build_toy_model(tok)
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.randint(0, len(tok), (2, 8))).logits.sum().backward()
    opt.step()
    measured = {"weights": sum(p.numel() * 4 for p in model.parameters()),
                "gradients": sum(p.grad.numel() * 4 for p in model.parameters()),
                "optimizer": sum(v.numel() * 4 for st in opt.state.values() for v in st.values()
                                 if v.dim() > 0)}
    est = dryrun.estimate(dryrun.shapes(model, _cfg()), _cfg(), world=1)
    assert {k: est[k] for k in measured} == measured
    pytest.importorskip("peft")
    from engine import lora
    adapted = lora.add_lora(build_toy_model(tok), rank=4, alpha=8, dropout=0.0,
                            targets=lora.LORA_TARGETS)
    trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert dryrun.shapes(build_toy_model(tok), _cfg(lora_rank=4))["trained"] == trained


def test_kv_cache_formula_is_exact():
    model = _qwen3(64, 128, 3, 4, 2, 16)
    R, S = 3, 40
    cache = DynamicCache(config=model.config)
    from engine.rollout import cache_argument
    model(input_ids=torch.randint(0, 64, (R, S)), use_cache=True, **{cache_argument(model): cache})
    measured = sum(t.numel() * 4 for layer in cache.layers for t in (layer.keys, layer.values))
    cfg = _cfg(max_new_tokens=S - 1, max_prompt_tokens=1, prompts_per_step=R, group_size=1)
    assert dryrun.estimate(dryrun.shapes(model, cfg), cfg, world=1)["KV cache"] == measured


def test_the_omni_recipe_dry_run_counts_both_towers(capsys):
    """Qwen2.5-Omni's thinker on the meta device: its vision tower (0.68B) and
    audio tower (0.64B) counted, LoRA's adapters on the language model only."""
    train.main(["--preset", "omniopsd-qwen2.5-omni-7b", "--dry-run"])
    out = capsys.readouterr().out
    assert "parameters: 8.932B" in out and "vision tower 0.677B" in out and "audio tower 0.640B" in out
    cfg = config.parse_config(["--preset", "omniopsd-qwen2.5-omni-7b", "--dry-run"])
    s = dryrun.shapes(dryrun.meta_model(dryrun.model_config(cfg)[0]), cfg)
    per_layer = sum(16 * (i + o) for i, o in ((3584, 3584), (3584, 512), (3584, 512), (3584, 3584),
                                                (3584, 18944), (3584, 18944), (18944, 3584)))
    assert s["trained"] == 28 * per_layer  # q k v o gate up down of 28 layers, r = 16


def test_dry_run_counts_each_external_teacher_and_the_rollout_policy(capsys):
    """OPD with two teachers: each one's parameters (from its shipped config.json) and memory
    per GPU, their sum in the peak; --rollout-refresh 0 keeps one more copy of the student."""
    base = ["--algo", "opd", "--model", "Qwen/Qwen3-1.7B", "--dtype", "bfloat16", "--dry-run",
            "--gpus", "8", "--max-new-tokens", "1024"]
    train.main(base + ["--teacher", "big=Qwen/Qwen3-8B", "--teacher", "small=Qwen/Qwen3-4B"])
    out = capsys.readouterr().out
    sizes = dict(re.findall(r"external teacher (\w+): ([\d.]+)B parameters", out))
    assert set(sizes) == {"big", "small"}
    assert abs(float(sizes["big"]) - PUBLISHED["Qwen/Qwen3-8B"]) < 0.1
    assert abs(float(sizes["small"]) - PUBLISHED["Qwen/Qwen3-4B"]) < 0.1
    both = float(re.search(r"external teachers\s+([\d.]+) GB", out).group(1))
    expected = 4 * (float(sizes["big"]) + float(sizes["small"])) / 8  # float32, over 8 GPUs
    assert abs(both - expected) < 0.02  # the printed values' rounding (3 and 2 decimals)
    train.main(base + ["--teacher", "big=Qwen/Qwen3-8B"])
    one = capsys.readouterr().out
    assert "1 teacher/reference copies" not in one and "0 teacher/reference copies" in one
    train.main(base + ["--teacher", "big=Qwen/Qwen3-8B", "--rollout-refresh", "0"])
    assert "1 teacher/reference copies" in capsys.readouterr().out
