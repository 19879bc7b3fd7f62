"""Runs that survive: NaN steps, crashes during checkpoint writes, bad input, degenerate
rollouts, determinism, and exact resume under torchrun."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint as ckpt, losses
import train
from engine.toy import warmstart
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
    assert not os.path.exists(os.path.join(out, "checkpoint-000002.tmp"))  # its space given back
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
    # RLSD's paper teacher prompt is ~330 tokens: a toy model with room for it (the run
    # refuses a teacher prompt longer than the model's context)
    from engine.toy.models import build_toy_model, build_toy_tokenizer
    tok = build_toy_tokenizer()
    build_toy_model(tok, max_position_embeddings=1024).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "rlsd", "--data", str(f),
                       "--eval-data", "", "--max-new-tokens", "1", "--model", str(tmp_path / "m")])
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
               "--out", out, "--steps", str(steps), "--teacher-sync", "3",
               "--lr-schedule", "constant", *extra]  # the stopped run has --steps 2
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    torchrun(full, 4)
    torchrun(part, 2)
    torchrun(part, 4, "--resume", "true")
    def strip(rows):  # no wall-clock timings, no evaluations
        return [{k: v for k, v in r.items() if not k.endswith(("_s", "_acc", "_leakage"))}
                for r in rows if r["step"] > 0]
    assert strip(_rows(part)) == strip(_rows(full))
    a = load_file(os.path.join(full, "checkpoint-000004", "model.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the first ten minutes: never lose a run, one message per mistake ----------------------

def _main(cache, out, *args):
    train.main(TINY + ["--cache-dir", cache, "--out", str(out), *args])


def test_a_run_is_never_clobbered_or_mixed(tmp_path, cache, capsys):
    out = tmp_path / "run"
    _main(cache, out, "--algo", "grpo")
    with pytest.raises(SystemExit, match="is not empty .*--resume.*--overwrite"):
        _main(cache, out, "--algo", "grpo")
    with pytest.raises(SystemExit) as e:  # a typo is not read as false
        _main(cache, out, "--algo", "grpo", "--resume", "ture")
    assert e.value.code == 2 and "expected true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"other settings \(--algo 'grpo' -> 'rlsd'\)"):
        _main(cache, out, "--algo", "rlsd", "--resume", "--steps", "3")
    assert [r["step"] for r in _rows(out)] == [0, 1, 2]  # untouched by the refused runs
    _main(cache, out, "--algo", "rlsd", "--overwrite", "--steps", "1")
    assert [r["step"] for r in _rows(out)] == [0, 1]
    assert ckpt.list_checkpoints(str(out)) == [str(out / "checkpoint-000001")]


def test_a_second_run_on_the_same_out_is_refused(tmp_path, cache):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(600)"), str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SystemExit, match="is in use by a running training"):
        _main(cache, out, "--algo", "grpo")
    holder.kill()  # a dead process holds no lock
    holder.wait()
    _main(cache, out, "--algo", "grpo", "--steps", "1")
    assert [r["step"] for r in _rows(out)] == [0, 1]


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer_state.pt"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, cache, capsys, damage):
    out = tmp_path / "run"
    _main(cache, out, "--algo", "rlsd", "--steps", "3", "--save-every", "1")
    f = out / "checkpoint-000003" / damage
    f.write_bytes(f.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
    _main(cache, out, "--algo", "rlsd", "--steps", "4", "--resume")
    printed = capsys.readouterr().out
    assert f"checkpoint-000003 is damaged ({damage}" in printed
    assert "resumed from" in printed and "checkpoint-000002 (step 2)" in printed
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4]


def test_a_failed_checkpoint_write_is_one_message(tmp_path, cache, monkeypatch):
    out = tmp_path / "run"

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit, match=r"could not write the step-2 checkpoint in .*No space "
                                         r"left on device.*GiB free there"):
        _main(cache, out, "--algo", "grpo")


def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path, cache):
    out = str(tmp_path / "run")
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--cache-dir", cache,
            "--out", out, "--algo", "grpo", "--steps", "40", "--save-on-signal"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for two finished steps
        if os.path.exists(os.path.join(out, "metrics.jsonl")) and len(_rows(out)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]  # 128 + 15
    assert "SIGTERM" in stdout and "continue with:" in stderr and "--resume" in stderr
    k = ckpt.load_trainer_state(ckpt.latest_checkpoint(out))["step"]
    assert [r["step"] for r in _rows(out)][-1] == k  # the finished step was checkpointed
    train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "grpo",
                       "--steps", str(k + 2), "--resume"])
    assert [r["step"] for r in _rows(out)] == list(range(0, k + 3))  # no gap, no duplicate


def test_warm_start_is_deterministic_and_keyed_to_its_settings(tmp_path, capsys):
    from engine import config
    dirs, printed = [], []
    for name in ("a", "b"):
        d = tmp_path / name
        train.main(["--algo", "grpo", "--steps", "0", "--cache-dir", str(d), "--eval-n", "4",
                    "--warm-start-steps", "12", "--out", str(d / "run")])
        dirs.append(warm_start_dir(str(d), steps=12))
        out = capsys.readouterr().out
        assert "warm start (student): supervised fine-tuning" in out and "minutes" in out
        printed.append([re.findall(r"loss=[\d.e-]+", line) for line in out.splitlines()
                        if line.startswith("warm start: [")])
    assert printed[0] == printed[1] and len(printed[0]) == 12  # a progress line per step
    assert os.path.basename(dirs[0]) == os.path.basename(dirs[1])
    a, b = (open(os.path.join(x, "model.safetensors"), "rb").read() for x in dirs)
    assert a == b  # bit-identical weights from two empty caches
    sft = config.resolve_config(dict(algo="sft", model="toy", steps=12))
    key = warmstart.warm_start_key(sft)
    assert key == warmstart.warm_start_key(config.resolve_config(dict(algo="sft", model="toy",
                                                                  steps=12, eval_n=7)))
    assert key != warmstart.warm_start_key(config.resolve_config(dict(algo="sft", model="toy",
                                                                  steps=12, lr=1e-3)))


@pytest.mark.parametrize("args,message", [
    (["--out", "README.md"], "--out README.md: is a file"),
    (["--lr", "-1"], "--lr must be > 0.0, got -1.0"),
    (["--temperature", "-0.5"], "--temperature must be > 0.0"),
    (["--temperature", "0"], "--temperature must be > 0.0"),
    (["--dtype", "float17"], "--dtype must be one of float32, bfloat16"),
    (["--model", "tests"], "--model tests: directory has no config.json"),
    (["--model", "./missing-model"], "--model ./missing-model: no such directory"),
    (["--model", "README.md"], "--model README.md: is a file"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    (["--steps", "1.5"], "argument --steps: invalid int value"),
])
def test_bad_options_are_one_config_error_line(args, message):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("config error: ") and message in lines[0]


def test_prompt_length_guard_is_on_by_default(tmp_path, cache, capsys):
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": "1+2", "answer": "3"}) + "\n"
                 + json.dumps({"prompt": "1+" * 200 + "1", "answer": "201"}) + "\n")
    with pytest.raises(SystemExit) as e:
        _main(cache, tmp_path / "o", "--algo", "grpo", "--data", str(f), "--eval-data", "")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "long.jsonl:2: prompt has" in err and "the model's context minus --max-new-tokens = 240" in err


def test_two_first_runs_share_one_warm_start(tmp_path):
    """Two processes started together on an empty cache: one builds the warm start under a
    lock, the other waits for it; both run, and only one warm start exists."""
    cache = str(tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--algo", "grpo",
                               "--steps", "0", "--cache-dir", cache, "--eval-n", "4",
                               "--warm-start-steps", "40", "--out", str(tmp_path / name)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for name in ("a", "b")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    printed = "".join(o for o, _ in outs)
    assert printed.count("warm start (student): supervised fine-tuning") == 1  # built once
    # (the other process prints that it waits, unless it started after the build was done)
    assert len([n for n in os.listdir(cache) if "." not in n]) == 1


class _Planted:
    """What a crafted trainer_state.pt holds: unpickling it calls os.makedirs(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_resume_never_runs_code_from_a_checkpoint(tmp_path, cache, capsys):
    """A trainer_state.pt whose unpickling would run code (here: create a directory) is
    refused with one message naming it; the code never runs; ordinary checkpoints resume."""
    out, marker = str(tmp_path / "run"), str(tmp_path / "code-ran")
    _main(cache, out, "--algo", "grpo")
    state = os.path.join(out, "checkpoint-000002", "trainer_state.pt")
    saved = torch.load(state, weights_only=True)  # what this project writes loads safely
    torch.save({**saved, "extra": _Planted(marker)}, state)
    with pytest.raises(SystemExit, match=r"trainer_state.pt holds objects other than tensors "
                                         r"and plain values .*could run code, so it is not loaded"):
        _main(cache, out, "--algo", "grpo", "--steps", "3", "--resume")
    assert not os.path.exists(marker)
    assert "damaged" not in capsys.readouterr().out  # refused, not skipped for an older one
    torch.save(saved, state)  # the genuine file resumes
    _main(cache, out, "--algo", "grpo", "--steps", "3", "--resume")
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3]
