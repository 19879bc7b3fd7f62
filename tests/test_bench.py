"""bench.py runs end to end and prints its table (a smoke test: no timing is asserted)."""
import bench


def test_bench_prints_phases_and_ratio(capsys):
    bench.main(["--algos", "grpo,rlsd", "--steps", "1", "--warmup", "0", "--max-new-tokens", "4",
                "--prompts-per-step", "2", "--group-size", "2"])
    out = capsys.readouterr().out
    assert "| grpo | 2 | 4 |" in out and "| rlsd | 2 | 4 |" in out
    assert "RLSD / GRPO step time:" in out
