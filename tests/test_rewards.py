"""Pluggable rewards (docs/fidelity.md F14): built-ins, a plug-in loaded by path, math-verify in workers
with a timeout, and DAPO's dynamic-sampling filter on correctness (F7)."""
import importlib.util
import time

import pytest
import torch

import data
from engine import rewards
from engine.batch import Batch, dapo_resample

EX = data.Example(prompt="2+3", answer="5")


def test_builtin_rewards():
    assert rewards.score(rewards.load_reward("verifier"), ["2+3=5", "2+3=6"], [EX, EX]) == \
        ([1.0, 0.0], [True, False])
    assert rewards.score(rewards.load_reward("dapo"), ["=5", "=6"], [EX, EX]) == \
        ([1.0, -1.0], [True, False])
    fmt = rewards.load_reward("rlsd_format")
    s, acc = rewards.score(fmt, ["<thought>2+3</thought> <answer>5</answer>", "5",
                                 "<thought>x</thought><answer>4</answer>"], [EX] * 3)
    assert s == pytest.approx([1.0, 0.9, 0.1]) and acc == [True, True, False]


def test_reward_plugin_loaded_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def by_length(response, answer, **row):\n"
        "    return {'score': len(response) / 10, 'acc': response == answer + row['hint']}\n"
        "def plain(response, answer, **_):\n"
        "    return -1.0\n"
        "def broken(response, answer, **_):\n"
        "    return {'acc': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = rewards.load_reward("my_rewards:by_length")
    ex = data.Example(prompt="p", answer="ab", hint="c")
    assert rewards.score(f, ["abc", "xyz12"], [ex, ex]) == ([0.3, 0.5], [True, False])
    # a bare float: correct when positive
    assert rewards.score(rewards.load_reward("my_rewards:plain"), ["a"], [ex]) == ([-1.0], [False])
    # a plug-in that breaks: one message naming it and the row
    with pytest.raises(data.DataError, match=r"--reward broken failed on d\.jsonl:7: KeyError"):
        rewards.score(rewards.load_reward("my_rewards:broken"), ["a"],
                      [data.Example(prompt="p", answer="a", where="d.jsonl:7")])


@pytest.mark.parametrize("spec, words", [("nope", "expected one of"),
                                         ("no_such_module_xyz:f", "cannot load"),
                                         ("engine.rewards:no_such_function", "cannot load"),
                                         ("engine.rewards:MATH_VERIFY_TIMEOUT", "not a function")])
def test_bad_reward_spec_is_a_config_error(spec, words):
    with pytest.raises(SystemExit, match=words):
        rewards.load_reward(spec)


def test_bad_reward_flag_fails_before_any_work():
    from engine.config import parse_config
    with pytest.raises(SystemExit, match="--reward"):
        parse_config(["--reward", "nope"])
    assert parse_config(["--algo", "dapo"]).reward == "dapo"  # DAPO's +-1 by default
    assert parse_config([]).reward == "verifier"


def _sleep_then_one(response, answer):  # a worker that hangs for `answer` seconds
    time.sleep(float(answer))
    return 1.0


def test_worker_timeout_scores_zero_and_the_pool_recovers(monkeypatch):
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT", 10.0)  # generous on a loaded machine
    f = rewards._MathVerify(workers=2, worker=_sleep_then_one)
    t = time.time()
    # the hung one scores 0; the quick ones, before and after it, are still scored
    assert f.many([("a", "0"), ("b", "60"), ("c", "0"), ("d", "0")]) == [1.0, 0.0, 1.0, 1.0]
    assert time.time() - t < 30  # not 60: the hung worker was killed
    assert f.many([("e", "0")]) == [1.0]  # a fresh pool
    f.close()


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                    reason="math-verify not installed (pip install -e '.[math]')")
def test_math_verify_handles_latex_and_never_rewards_an_unparseable_gold(capsys):
    f = rewards.load_reward("math_verify")
    exs = [data.Example("p", "1/2"), data.Example("p", "\\frac{1}{2}"),
           data.Example("p", "\\sqrt{2}"), data.Example("p", "(1,2]"), data.Example("p", "")]
    texts = ["so \\boxed{\\dfrac{1}{2}}", "the answer is $0.5$", "$\\sqrt 2$",
             "\\boxed{(1, 2]}", "\\boxed{}"]
    assert rewards.score(f, texts, exs)[0] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert "cannot parse the gold answer" in capsys.readouterr().err
    f.close()
    assert data.reward("\\boxed{(1, 2]}", "(1,2]") == 0.0  # what the built-in parser misses


def _batch(correct, rewards_):
    n = len(correct)
    return Batch([EX] * n, torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                 torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                 torch.zeros(n, dtype=torch.bool), ["x"] * n, torch.tensor(rewards_),
                 torch.tensor(correct), in_loss=torch.ones(n, dtype=torch.bool))


def test_dapo_filters_on_correctness_not_on_the_length_shaped_reward():
    # group 0: all wrong, rewards differ only by the overlong penalty -> dropped;
    # group 1: one right -> kept
    b = _batch([False, False, True, False], [-1.0, -1.3, 1.0, -1.0])
    out = dapo_resample(b, lambda exs: _batch([False] * len(exs), [-1.0] * len(exs)),
                        group_size=2, rounds=2, pad_id=0)
    assert out.in_loss.tolist() == [False, False, True, True]
