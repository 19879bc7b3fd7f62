"""Runs that survive: NaN steps, crashes during checkpoint writes, bad input, degenerate
rollouts, determinism, and exact resume under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as ckpt
import losses
import train
from conftest import warm_start_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "16",
        "--eval-n", "4", "--warm-start-steps", "30", "--eval-every", "0"]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _nan_on(calls, real):
    """A loss function that returns NaN on the listed calls (1-based) and is real otherwise."""
    count = {"n": 0}

    def loss(*args, **kwargs):
        count["n"] += 1
        value, m = real(*args, **kwargs)
        return (value * float("nan") if count["n"] in calls else value), m
    return loss


def test_nan_step_is_skipped_and_run_continues(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(losses, "chunk_loss", _nan_on({1}, losses.chunk_loss))
    out = str(tmp_path / "r")
    train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "sdpo", "--steps", "3"])
    rows = [r for r in _rows(out) if r["step"] > 0]
    assert [r["skipped"] for r in rows] == [1.0, 0.0, 0.0]
    assert all(torch.isfinite(v).all() for v in
               load_file(os.path.join(out, "checkpoint-000003", "model.safetensors")).values())


def test_consecutive_nan_steps_stop_the_run(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(losses, "chunk_loss", _nan_on(set(range(1, 100)), losses.chunk_loss))
    out = str(tmp_path / "r")
    with pytest.raises(SystemExit, match=r"stopping at step 3: 3 consecutive steps with a non-finite"):
        train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "grpo", "--steps", "10",
                           "--max-skips", "3"])
    assert [r["skipped"] for r in _rows(out) if r["step"] > 0] == [1.0, 1.0, 1.0]


class _BrokenTokenizer:
    def save_pretrained(self, path):
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write("{")  # half-written
        raise OSError("disk full")


def test_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = warm_start_dir(cache)
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    out = str(tmp_path / "run")
    kw = dict(model_state=model.state_dict(), model_config=model.config,
              trainer_state={"step": 0}, keep=2)
    ckpt.save_checkpoint(out, 1, tokenizer=tok, **kw)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(out, 2, tokenizer=_BrokenTokenizer(), **kw)
    assert os.path.isdir(os.path.join(out, "checkpoint-000002.tmp"))  # debris, never picked
    assert ckpt.latest_checkpoint(out) == os.path.join(out, "checkpoint-000001")
    AutoModelForCausalLM.from_pretrained(ckpt.latest_checkpoint(out))
    for step in (3, 4, 5):  # keep the newest 2; the next write removes the debris
        ckpt.save_checkpoint(out, step, tokenizer=tok, **kw)
    assert sorted(os.listdir(out)) == ["checkpoint-000004", "checkpoint-000005"]


def test_killed_process_resumes_from_newest_complete_checkpoint(tmp_path, cache):
    """SIGKILL a training process while it writes checkpoints every step, then resume."""
    out = str(tmp_path / "run")
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--cache-dir", cache,
            "--out", out, "--algo", "grpo", "--steps", "40", "--save-every", "1",
            "--keep-checkpoints", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill as a .tmp write is under way
        if len(ckpt.list_checkpoints(out)) >= 2 and any(n.endswith(".tmp") for n in os.listdir(out)):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None, proc.stderr.read().decode()[-2000:]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(latest)
    k = ckpt.load_trainer_state(latest)["step"]
    train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "grpo",
                       "--steps", str(k + 2), "--resume", "true"])
    assert [r["step"] for r in _rows(out)][-2:] == [k + 1, k + 2]


def test_same_seed_same_metrics(tmp_path, cache):
    def metrics(name):
        out = str(tmp_path / name)
        train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "rlsd"])
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in _rows(out)]
    assert metrics("a") == metrics("b")


def test_degenerate_rollouts_give_finite_zero_updates(tmp_path, cache):
    """One-token responses (truncated, or empty when the token is <eos>) to questions whose
    answers have two digits: every reward is 0, so the loss and gradient are exactly 0."""
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "answer": str(a + b)}) + "\n"
                         for a, b in [(10, 20), (31, 40), (55, 11), (70, 18)]))
    out = str(tmp_path / "r")
    train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "rlsd", "--data", str(f),
                       "--eval-data", "", "--max-new-tokens", "1"])
    rows = [r for r in _rows(out) if r["step"] > 0]
    for r in rows:
        assert r["loss"] == 0.0 and r["grad_norm"] == 0.0 and r["skipped"] == 0.0
        assert r["response_len_mean"] == 1.0


def test_bad_inputs_fail_before_training(tmp_path, cache, capsys):
    def fails(*args, code=2):
        with pytest.raises(SystemExit) as e:
            train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "o"), *args])
        assert e.value.code == code
        return capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+2", "answer": "3"}) + "\n"
                    + json.dumps({"prompt": "1+2+3+4+5+6+7+8", "answer": "36"}) + "\n")
    assert "good.jsonl:2: prompt has" in fails("--algo", "grpo", "--data", str(good),
                                                  "--max-prompt-tokens", "8")
    assert "no row has a 'hint' value" in fails("--algo", "ptdpo", "--data", str(good))
    img = tmp_path / "bad.jsonl"
    (tmp_path / "x.png").write_bytes(b"not a png")
    img.write_text(json.dumps({"prompt": "1+2", "answer": "3", "images": ["x.png"]}) + "\n")
    assert "bad.jsonl:1: image" in fails("--algo", "grpo", "--data", str(img))
    nodir = tmp_path / "model"
    nodir.mkdir()
    (nodir / "config.json").write_text("{}")
    assert "has no tokenizer" in fails("--algo", "grpo", "--model", str(nodir))
    assert "invalid choice" in fails("--algo", "ppo")


def test_long_prompts_can_be_skipped(tmp_path, cache, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "1+2", "answer": "3"}) + "\n"
                 + json.dumps({"prompt": "1+2+3+4+5+6+7+8", "answer": "36"}) + "\n")
    train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "o"), "--algo", "grpo",
                       "--data", str(f), "--eval-data", "", "--max-prompt-tokens", "8",
                       "--long-prompts", "skip"])
    assert "skipped 1 of 2 prompts longer than 8 tokens" in capsys.readouterr().out


def test_resume_under_torchrun_matches_uninterrupted(tmp_path, cache):
    def torchrun(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), *TINY, "--algo", "rlsd", "--cache-dir", cache,
               "--out", out, "--steps", str(steps), "--teacher-sync", "3", *extra]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    torchrun(full, 4)
    torchrun(part, 2)
    torchrun(part, 4, "--resume", "true")
    def strip(rows):  # no wall-clock timings, no evaluations
        return [{k: v for k, v in r.items() if not k.endswith(("_s", "_acc"))}
                for r in rows if r["step"] > 0]
    assert strip(_rows(part)) == strip(_rows(full))
    a = load_file(os.path.join(full, "checkpoint-000004", "model.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
