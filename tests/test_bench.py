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
