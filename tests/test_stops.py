"""Stops a scheduler understands, and writes that fail cleanly.

A signal during evaluation or the warm start ends the run at once with 128 + the signal's
number (143 SIGTERM, 130 Ctrl-C); a write that fails (a full disk: a small tmpfs where one can
be mounted, injected errors everywhere) is one message naming the directory and its free
space, and the checkpoints written before stay intact."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import train
from engine import checkpoint as ckpt, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "16",
        "--eval-n", "4", "--warm-start-steps", "30", "--eval-every", "0"]


def _start(args, cache_dir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, "--cache-dir", cache_dir]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _signal_when(proc, marker: str, sig) -> tuple[str, str]:
    """Send `sig` once stdout has printed a line containing `marker`; (stdout, stderr)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return "".join(lines) + out, err


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_evaluation_stops_at_once(tmp_path, cache, sig, status):
    """2000 + 2000 greedy test and OOD problems (and 2000 answer-shown ones): the evaluation
    before training is far from done when the signal comes, and it ends there, with no step
    trained, nothing logged for it, and the scheduler's status for that signal."""
    out = str(tmp_path / "run")
    proc = _start([*TINY, "--algo", "grpo", "--eval-n", "2000", "--out", out], cache)
    stdout, stderr = _signal_when(proc, "evaluation: test 2000", sig)
    assert proc.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    # (the signal may land between the line announcing the evaluation and its first batch)
    assert re.search(r"stopped (during|before) the evaluation before training", stderr)
    assert "before training:" not in stdout  # it never finished
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert f.read() == ""


def test_a_signal_during_the_warm_start_stops_at_once(tmp_path):
    """A fresh cache: SIGTERM while the toy is warm-started ends the run with 143 and leaves
    no warm start in the cache (a half-trained one would be used by every later run)."""
    fresh = str(tmp_path / "cache")
    proc = _start([*TINY, "--warm-start-steps", "5000", "--out", str(tmp_path / "run")], fresh)
    stdout, stderr = _signal_when(proc, "warm start: [", signal.SIGTERM)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped during the warm start" in stderr
    assert not [n for n in os.listdir(fresh) if n.startswith("toy-student-") and "." not in n]


@contextlib.contextmanager
def small_disk(path, megabytes: int):
    """A tmpfs of that size mounted at `path` (root only; skipped where it cannot be)."""
    os.makedirs(path)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected errors still run")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path])


def test_a_full_disk_is_one_message_and_keeps_the_earlier_checkpoint(tmp_path, cache):
    """A 6 MB filesystem holds one checkpoint of the toy (weights 1.2 MB, AdamW state 2.4 MB),
    not two: the second write fails with one message, and the first still loads."""
    with small_disk(str(tmp_path / "disk"), 6) as disk:
        out = os.path.join(disk, "run")
        proc = _start([*TINY, "--algo", "grpo", "--steps", "3", "--save-every", "1",
                       "--out", out], cache)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
        assert "could not write the step-2 checkpoint in" in stderr and "GiB free there" in stderr
        assert "0.00 GiB free there" in stderr  # (torch.save's own words are less clear)
        first = ckpt.latest_checkpoint(out)
        assert first == os.path.join(out, "checkpoint-000001")
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # its space given back
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(first)
        assert ckpt.load_trainer_state(first)["step"] == 1


@pytest.mark.parametrize("writer,error", [
    ("save_file", SafetensorError("Error while serializing: I/O error: No space left on device")),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704")),
    ("metrics", OSError(28, "No space left on device")),
    ("config", OSError(28, "No space left on device"))])
def test_every_failed_write_is_one_message(tmp_path, cache, monkeypatch, capsys, writer, error):
    """safetensors' and torch.save's own error types, and the metrics log and the config, each
    fail as the disk would make them: one message, the directory, its free space."""
    out = str(tmp_path / "run")
    calls = {"n": 0}

    def failing(*args, **kwargs):
        raise error

    if writer == "save_file":  # the second checkpoint's weights
        real = ckpt.save_file

        def second(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs) if calls["n"] == 1 else failing()
        monkeypatch.setattr(ckpt, "save_file", second)
    elif writer == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", failing)
    else:  # the file the run log opens for it
        real_open = open
        name = "metrics.jsonl" if writer == "metrics" else "config.json.tmp"

        def opening(path, mode="r", *args, **kwargs):
            if str(path).endswith(name) and mode in ("a", "w"):
                calls["n"] += 1
                if writer == "config" or calls["n"] > 1:  # metrics: the step-1 line
                    raise error
            return real_open(path, mode, *args, **kwargs)
        monkeypatch.setattr(rundir, "open", opening, raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--cache-dir", cache, "--out", out, "--algo", "grpo",
                           "--save-every", "1"])
    message = str(e.value.code)
    assert message.startswith("error: could not write") and f"in {out}" in message
    assert "GiB free there" in message, message
    if writer == "save_file":
        assert "step-2 checkpoint" in message and "No space left on device" in message
        assert ckpt.latest_checkpoint(out).endswith("checkpoint-000001")
        assert torch.load(os.path.join(out, "checkpoint-000001", "trainer_state.pt"),
                          weights_only=True)["step"] == 1
    if writer == "torch.save":
        assert "trainer_state.pt: RuntimeError" in message and ckpt.latest_checkpoint(out) is None
    if writer == "metrics":
        assert "step 1's metrics" in message
        with open(os.path.join(out, "metrics.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f] == [0]


def test_a_tracker_that_cannot_write_is_one_message(tmp_path, cache, monkeypatch):
    from engine import trackers

    def full(self, record):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trackers.Trackers, "log", full)
    with pytest.raises(SystemExit, match=r"could not write step 0's metrics in .*GiB free"):
        train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "run"),
                           "--report-to", "tensorboard"])
