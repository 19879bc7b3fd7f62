"""bench.py runs end to end and prints its table (a smoke test: no timing is asserted)."""
import bench


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

    import distributed
    from rollout import build_toy_model, build_toy_tokenizer
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
