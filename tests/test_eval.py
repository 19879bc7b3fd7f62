"""eval.py: pass@k, leakage, checkpoint evaluation, run comparison tables and plots."""
import json
import os

import pytest

import eval as ev
from conftest import warm_start_dir


def test_pass_at_k_hand_values():
    assert ev.pass_at_k(4, 0, 1) == 0.0 and ev.pass_at_k(4, 4, 2) == 1.0
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(0.5)   # 1 - C(3,2)/C(4,2)
    assert ev.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)


def test_leakage():
    texts = ["Using the reference solution, x = 2", "x = 2", "As THE HINT says"]
    assert ev.leakage(texts, ["reference solution", "the hint"]) == pytest.approx(2 / 3)
    assert ev.leakage([], ["x"]) == 0.0


def test_evaluate_checkpoint_cli(cache, capsys):
    ck = warm_start_dir(cache)
    ev.main([ck, "--n", "6", "--k", "2", "--temperature", "1.0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["split"] for r in lines] == ["test", "ood"]
    for r in lines:
        assert 0 <= r["pass@1_greedy"] <= 1 and 0 <= r["avg@2"] <= r["pass@2"] <= 1
        assert r["response_len_mean"] > 0 and r["entropy"] >= 0 and 0 <= r["leakage"] <= 1


def _fake_run(d, values):
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for step, acc in enumerate(values):
            f.write(json.dumps({"step": step, "test_acc": acc, "reward_mean": acc / 2}) + "\n")
    return d


def test_compare_table_and_plot(tmp_path, capsys):
    a = _fake_run(str(tmp_path / "grpo"), [0.1, 0.2, 0.3])
    b = _fake_run(str(tmp_path / "rlsd"), [0.1, 0.4])
    png = str(tmp_path / "cmp.png")
    ev.main(["--compare", a, b, "--plot", png])
    out = capsys.readouterr().out
    assert "| grpo | 2 | 0.1 -> 0.3 |" in out and "| rlsd | 1 | 0.1 -> 0.4 |" in out
    assert os.path.getsize(png) > 1000


def test_compare_missing_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--compare", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err
