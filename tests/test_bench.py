"""bench.py runs end to end and prints its table (a smoke test: no timing is asserted)."""
from tools import bench


def test_bench_prints_phases_and_ratio(capsys):
    bench.main(["--algos", "grpo,rlsd", "--steps", "1", "--warmup", "0", "--max-new-tokens", "4",
                "--prompts-per-step", "2", "--group-size", "2"])
    out = capsys.readouterr().out
    assert "| grpo | 2 | 4 |" in out and "| rlsd | 2 | 4 |" in out
    assert "RLSD / GRPO step time:" in out


def test_ops_per_chunk_counts_the_chunked_lm_head(capsys):
    """Each LM-head chunk adds a fixed number of tensor ops; RLSD's teacher adds more."""
    grpo, rlsd = bench.ops_per_chunk("grpo"), bench.ops_per_chunk("rlsd")
    assert grpo > 50 and rlsd > grpo and grpo == int(grpo)
    bench.main(["--algos", "grpo", "--ops-per-chunk"])
    assert f"grpo: {grpo:.0f} tensor ops per LM-head chunk" in capsys.readouterr().out


def test_wide_vocabularies_on_cpu_get_the_fixed_mmap_threshold(monkeypatch):
    """distributed.release_large_blocks: only a wide LM head on the CPU, never the toy or a
    GPU, and an explicit MALLOC_MMAP_THRESHOLD_ wins (the memory itself: BENCH.md)."""
    import sys

    import torch

    from engine import distributed
    from engine.toy.models import build_toy_model, build_toy_tokenizer
    tok = build_toy_tokenizer()
    toy, wide = build_toy_model(tok), build_toy_model(tok, vocab_size=40000, hidden_size=8,
                                                      intermediate_size=8, head_dim=2,
                                                      num_hidden_layers=1)
    cpu = torch.device("cpu")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert not distributed.release_large_blocks(toy, cpu)
    assert not distributed.release_large_blocks(wide, torch.device("cuda"))
    assert distributed.release_large_blocks(wide, cpu) == sys.platform.startswith("linux")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    assert not distributed.release_large_blocks(wide, cpu)


def test_vs_trl_compares_at_each_size_in_one_table(monkeypatch, capsys):
    """--vs-trl-sizes: ours and TRL's step at each size, one row each (the runs themselves are
    faked here: TRL is a benchmark-only dependency)."""
    import pytest
    calls = []

    def fake(args, **override):
        calls.append((override.get("shape", args.shape), bool(override.get("trl"))))
        params = {None: 0.3, "qwen3-3m": 3.2}[override.get("shape", args.shape)]
        return dict(step_s=1.0 if override.get("trl") else 0.4, rollout=0.1, fwd_bwd=0.2,
                    teacher=0.0, optimizer=0.0, rollout_tok_s=1, forward_tok_s=1,
                    trained_tok_s=1, peak_mem_gb=0.1, full_logits_gb=0.0, algo="grpo", G=8,
                    L=64, P=8, threads=2, device="cpu", params_m=params)

    monkeypatch.setattr(bench, "run_isolated", fake)
    bench.main(["--algos", "grpo", "--vs-trl-sizes", "toy,qwen3-3m"])
    out = capsys.readouterr().out
    assert "| toy | 0.3 | 0.40 (0.10 / 0.20) | 1.00 | 0.40 |" in out
    assert "| qwen3-3m | 3.2 |" in out
    assert (None, True) in calls and ("qwen3-3m", True) in calls
    calls.clear()
    bench.main(["--algos", "grpo", "--vs-trl"])  # alone: at the goal's size, qwen3-3m
    assert calls[0] == ("qwen3-3m", False) and ("qwen3-3m", True) in calls
    with pytest.raises(SystemExit, match="unknown size"):
        bench.main(["--vs-trl-sizes", "qwen3-7b"])


def test_gpu_suite_runs_every_section_on_tiny_shapes(tmp_path, capsys):
    """`--gpu-suite --device cpu --tiny`: every section of the GPU measurement runs (so it
    cannot rot while no GPU is lent) and writes its table as JSON with the device named; a
    section that cannot run on this device (CUDA graphs) is an error row, not a crash."""
    import json
    bench.main(["--gpu-suite", "--device", "cpu", "--tiny", "--out", str(tmp_path)])
    with open(tmp_path / "gpu_suite.json") as f:
        report = json.load(f)
    assert report["device"].startswith("CPU") and report["tiny"]
    rows = {r["what"]: r for r in report["rows"] if "what" in r}
    assert [r for r in report["rows"] if "what" not in r] == []  # no section failed whole
    assert rows["memory bandwidth (copy)"]["gb_s"] > 0
    for mode in ("dynamic", "static", "dynamic, bf16 weights"):
        r = rows[f"rollout {mode}"]
        assert r["tokens_s"] > 0 and r["ms_per_step"] > 0 and r["x_floor"] > 0, r
    assert "error" in rows["rollout compiled"] or rows["rollout compiled"]["tokens_s"] > 0
    assert rows["teacher-forced forward"]["tokens_s"] > 0
    for what in ("rlsd step 2", "grpo step 2", "rlsd step 2, gradient_checkpointing",
                 "rlsd step 2, lora_rank"):
        assert rows[what]["step_s"] > 0 and rows[what]["peak_gb"] > 0, what
    assert [r["section"] for r in report["rows"]].count("vlm") == 2
    out = capsys.readouterr().out
    assert "| rollout | rollout dynamic |" in out and "| vlm | rlsd step 2 |" in out
