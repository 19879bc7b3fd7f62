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


def _file(tmp_path, n=24):
    """Toy problems with the question in a renamed column."""
    from engine.toy import arithmetic
    f = tmp_path / "problems.jsonl"
    f.write_text("".join(json.dumps(dict(question=e.prompt, answer=e.answer)) + "\n"
                         for e in arithmetic.make_toy("test", n)))
    return str(f)


def _trained_accuracy(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["eval_acc"]


def test_eval_py_reproduces_the_trainers_accuracy(tmp_path, cache, capsys):
    """A run with a non-default student template, a system prompt, a renamed column and its
    own reward function: eval.py CHECKPOINT --data FILE reads the prompts from the run's
    config.json (the reward function is typed again: a run directory is data, and eval.py
    imports no code it names) and gets the trainer's end-of-run greedy accuracy exactly. (The parity
    reward is about half right on any model, so the number depends on every generated
    token of every prompt: a prompt built differently would change it.)"""
    import train
    f, out = _file(tmp_path), str(tmp_path / "run")
    train.main(["--algo", "grpo", "--steps", "1", "--prompts-per-step", "4", "--group-size", "2",
                "--max-new-tokens", "40", "--warm-start-steps", "30", "--cache-dir", cache,
                "--data", f, "--eval-data", f, "--prompt-key", "question",
                "--student-template", "QQ{prompt}", "--system-prompt", "sub",
                "--reward", "signal_reward:parity", "--out", out])
    want = _trained_accuracy(out)
    assert 0.0 < want < 1.0
    capsys.readouterr()
    results = str(tmp_path / "results.jsonl")
    ev.main([os.path.join(out, "checkpoint-000001"), "--reward", "signal_reward:parity",
             "--data", f, "--out", results])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["pass@1_greedy"] == want
    with open(results) as r:
        assert json.loads(r.read())["pass@1_greedy"] == want
    # the defaults (no template, no system prompt) evaluate other prompts: another number
    ev.main([os.path.join(out, "checkpoint-000001"), "--reward", "signal_reward:parity",
             "--data", f, "--student-template", "{prompt}", "--system-prompt", ""])
    captured = capsys.readouterr()
    assert "overridden: --student-template, --system-prompt" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["pass@1_greedy"] != want


def test_eval_py_without_a_run_says_it_uses_the_defaults(cache, capsys):
    ev.main([warm_start_dir(cache), "--n", "4"])
    assert "no run config.json beside it; the default prompts" in capsys.readouterr().err


@pytest.mark.parametrize("path,message", [("missing", "no such directory"),
                                          ("file", "is a file"),
                                          ("dir", "has no config.json")])
def test_eval_py_names_a_path_that_is_not_a_model(tmp_path, capsys, path, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(SystemExit) as e:
        ev.main([str(tmp_path / path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
