"""What a hostile or careless user tries (issue 48): nothing handed to the project runs code,
nothing outside a run is deleted, and every bad value is one message and a non-zero exit.

Where the behaviour crosses the command line the test runs it as a subprocess, with stdin
closed (a prompt would hang or be answered by nobody), and checks the exit status, that no
traceback was printed, and that a planted payload never ran (it would write a marker file)."""
import json
import os
import signal
import struct
import subprocess
import sys
import wave
import zlib

import pytest
import torch

import data
import train
from engine import checkpoint as ckpt, config, presets, rundir
from engine.toy.models import build_toy_model, build_toy_tokenizer
from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(script, *args, cwd=ROOT, env=None, timeout=300):
    """(exit status, stdout + stderr) of `python script args` with stdin closed."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return res.returncode, res.stdout + res.stderr


def one_message(status, out, *expect):
    assert status != 0 and "Traceback" not in out, out[-3000:]
    for e in expect:
        assert e in out, out[-3000:]


def payload(marker):
    """A Python file that, if ever imported or run, writes `marker`."""
    code = f"open({str(marker)!r}, 'w').write('ran')\ndef f(*a, **k):\n    return 1.0\n"
    return code


def tiny_model_dir(path, seed=0, **overrides):
    tok = build_toy_tokenizer()
    build_toy_model(tok, seed=seed, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def rows_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- high: code from data, a run directory, a recipe or a model directory never runs ----

def test_eval_never_imports_the_reward_a_run_directory_names(tmp_path):
    marker = tmp_path / "RAN"
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (tmp_path / "runs" / "__init__.py").write_text("")
    (run / "__init__.py").write_text("")
    (run / "payload.py").write_text(payload(marker))
    ck = tiny_model_dir(run / "checkpoint-000001")
    (run / "config.json").write_text(json.dumps({"algo": "grpo", "reward": "runs.x.payload:f",
                                                 "data": "toy", "eval_data": "toy"}))
    status, out = cli("eval.py", ck, "--n", "2", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    one_message(status, out, "runs.x.payload:f", "--reward")
    assert not marker.exists()
    # typed on the command line, it is the user's choice, and eval.py says which it uses
    status, out = cli("eval.py", ck, "--n", "2", "--reward", "verifier", cwd=tmp_path)
    assert status == 0 and "reward: verifier" in out, out[-2000:]


def test_a_preset_is_a_name_in_recipes_never_a_path(tmp_path):
    marker = tmp_path / "RAN"
    (tmp_path / "evil.toml").write_text('[config]\nreward = "evilmod:f"\n')
    (tmp_path / "evilmod.py").write_text(payload(marker))
    status, out = cli("train.py", "--preset", str(tmp_path / "evil"), "--dry-run",
                      env={"PYTHONPATH": str(tmp_path)})
    one_message(status, out, "no such recipe in recipes/")
    assert not marker.exists()


def test_a_recipe_may_name_only_built_in_rewards(tmp_path, monkeypatch):
    marker = tmp_path / "RAN"
    (tmp_path / "mine.toml").write_text('[config]\nalgo = "grpo"\nreward = "evilmod2:f"\n')
    (tmp_path / "evilmod2.py").write_text(payload(marker))
    monkeypatch.setattr(presets, "RECIPES", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit, match="comes from a recipe, not the command line"):
        config.parse_config(["--preset", "mine"])
    assert not marker.exists()


def test_a_model_directory_that_needs_its_own_code_is_refused(tmp_path):
    marker = tmp_path / "RAN"
    m = tmp_path / "m"
    tiny_model_dir(m)
    c = json.loads((m / "config.json").read_text())
    c.update(model_type="evilmodel", auto_map={"AutoConfig": "evil.Cfg",
                                                "AutoModelForCausalLM": "evil.Model"})
    (m / "config.json").write_text(json.dumps(c))
    (m / "evil.py").write_text(payload(marker))
    f = rows_file(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": "2"}])
    for script, args in (("train.py", ["--model", m, "--algo", "grpo", "--data", f, "--dry-run"]),
                         ("train.py", ["--model", m, "--algo", "grpo", "--data", f,
                                       "--out", tmp_path / "o", "--steps", "1"]),
                         ("eval.py", [m, "--data", f])):
        status, out = cli(script, *args)
        one_message(status, out, "needs Python code of its own")
    assert not marker.exists()


def test_overwrite_never_deletes_what_no_run_wrote(tmp_path):
    model = tmp_path / "my-model"
    tiny_model_dir(model)
    f = rows_file(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": "2"}])
    status, out = cli("train.py", "--model", model, "--out", model, "--overwrite", "--data", f,
                      "--algo", "grpo", "--steps", "1")
    one_message(status, out, "--overwrite")
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()
    other = tmp_path / "other"
    (other / "checkpoint-best").mkdir(parents=True)
    (other / "config.json").write_text("{}")
    (other / "notes.txt").write_text("mine")
    status, out = cli("train.py", "--out", other, "--overwrite", "--algo", "grpo", "--steps", "1")
    one_message(status, out, "not one")
    assert (other / "checkpoint-best").exists() and (other / "notes.txt").exists()


def test_overwrite_clears_a_run_but_not_a_stranger_beside_it(tmp_path, cache):
    out = tmp_path / "run"
    train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--algo", "grpo"])
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="also holds mine.txt"):
        train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--algo", "grpo",
                           "--overwrite"])
    assert (out / "mine.txt").exists() and ckpt.latest_checkpoint(str(out))


# ---- medium ----------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["{prompt} {answer!s}", "{prompt} {answer!r}",
                                      "{prompt} {answer:}", "{prompt} {solution:>3}",
                                      "{prompt} {hint.x}", "{prompt} {rationale[0]}"])
def test_no_conversion_or_format_spec_shows_the_student_a_privileged_field(template):
    with pytest.raises(SystemExit, match="teacher-only field"):
        config.parse_config(["--student-template", template])


def _png(width=4, height=4, garbage=False):
    """A PNG whose chunk CRCs are right; with `garbage`, its pixel data does not decode."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    raw = b"" if garbage else b"".join(b"\0" + b"\x80" * (3 * width) for _ in range(height))
    pixels = b"not zlib at all" * 3 if garbage else zlib.compress(raw)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _wav(path, frames=0):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * frames)


@pytest.mark.parametrize("kind", ["png", "bomb", "wav", "array", "npy", "fps"])
def test_media_that_pass_a_shallow_check_are_refused_before_training(tmp_path, kind):
    import numpy as np
    row = {"prompt": "what?", "answer": "1"}
    if kind == "png":
        (tmp_path / "bad.png").write_bytes(_png(garbage=True))
        row["images"] = ["bad.png"]
    elif kind == "bomb":  # 400M pixels declared: PIL refuses to decompress it
        (tmp_path / "bomb.png").write_bytes(_png(width=20000, height=20000, garbage=True))
        row["images"] = ["bomb.png"]
    elif kind == "npy":  # an object array: loading it would unpickle
        np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        row["audios"] = ["obj.npy"]
    elif kind == "wav":
        _wav(tmp_path / "empty.wav")
        row["audios"] = ["empty.wav"]
    elif kind == "array":
        row["audios"] = [{"array": [], "sampling_rate": 16000}]
    else:
        (tmp_path / "f0.png").write_bytes(_png())
        row["videos"] = [{"frames": ["f0.png", "f0.png"], "fps": float("nan")}]
    f = rows_file(tmp_path / "m.jsonl", [row])
    status, out = cli("train.py", "--data", f, "--algo", "grpo", "--out", tmp_path / "o")
    one_message(status, out, "m.jsonl:1")


@pytest.mark.parametrize("flag", ["--lr", "--kl-coef", "--temperature", "--teacher-ema",
                                  "--success-threshold"])
def test_infinities_and_nans_are_refused(flag):
    args = ["--algo", "grpo"] if flag in ("--lr", "--kl-coef", "--temperature") else \
        ["--algo", "sdpo"]
    for value in ("inf", "nan"):
        with pytest.raises(SystemExit, match="finite"):
            config.parse_config([*args, flag, value])
    with pytest.raises(SystemExit, match="success-threshold must be"):
        config.parse_config(["--algo", "sdpo", "--success-threshold", "1.5"])


def test_a_run_whose_every_step_was_skipped_does_not_succeed(tmp_path, cache, monkeypatch):
    from engine import losses
    real = losses.chunk_loss

    def nan_loss(*a, **k):
        v, m = real(*a, **k)
        return v * float("nan"), m

    monkeypatch.setattr(losses, "chunk_loss", nan_loss)
    with pytest.raises(SystemExit, match="every one of the 2 steps"):
        train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "r"), "--algo", "grpo"])


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_one_named(tmp_path, cache):
    out = tmp_path / "r"
    args = TINY + ["--cache-dir", cache, "--out", str(out), "--algo", "grpo",
                   "--lr-schedule", "constant"]
    train.main(args)
    path = out / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "loss": 0.')  # a full disk's half line
    status, text = cli("eval.py", "--compare", out)
    assert status == 0 and "incomplete" in text and "Traceback" not in text, text
    train.main(args[:1] + ["4"] + args[2:] + ["--resume"])
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text("\n".join(lines) + "\n")
    status, text = cli("eval.py", "--compare", out)
    one_message(status, text, "metrics.jsonl: line 3")


def test_teacher_prompts_are_checked_against_the_context(tmp_path, cache):
    long = "1+1=2;" * 60  # a solution of 360 characters: the toy model's context is 256
    f = rows_file(tmp_path / "s.jsonl", [{"prompt": "1+1", "answer": "2", "solution": long}])
    status, out = cli("train.py", *TINY, "--cache-dir", cache, "--algo", "opsd", "--data", f,
                      "--student-template", "{prompt}", "--out", tmp_path / "o")
    one_message(status, out, "s.jsonl:1: the teacher's prompt")


def test_resume_refuses_a_data_file_rewritten_in_place(tmp_path, cache):
    rows = [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(8)]
    f = rows_file(tmp_path / "d.jsonl", rows)
    args = TINY + ["--cache-dir", cache, "--out", str(tmp_path / "r"), "--algo", "grpo",
                   "--data", f]
    train.main(args)
    rows_file(tmp_path / "d.jsonl", rows[::-1])  # the same path, other contents
    with pytest.raises(SystemExit, match="is not the file"):
        train.main(args + ["--steps", "3", "--resume"])


def test_resume_on_a_replaced_model_of_another_size_is_one_message(tmp_path, cache):
    model = tmp_path / "m"
    tiny_model_dir(model)
    f = rows_file(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": "2"}] * 4)
    args = TINY + ["--cache-dir", cache, "--out", str(tmp_path / "r"), "--algo", "grpo",
                   "--data", f, "--model", str(model)]
    train.main(args)
    tiny_model_dir(model, hidden_size=48, head_dim=12)  # replaced, another shape
    with pytest.raises(SystemExit, match="does not fit this model"):
        train.main(args + ["--steps", "3", "--resume"])


def test_a_signal_during_a_checkpoint_write_stops_after_that_step(tmp_path, cache, monkeypatch):
    real = ckpt.save

    def save_with_signal(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the write
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save", save_with_signal)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--algo", "grpo",
                           "--steps", "6", "--save-every", "1"])
    assert e.value.code == 143
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
        == [0, 1]  # not one step later
    assert ckpt.latest_checkpoint(str(out)).endswith("checkpoint-000001")


def test_a_response_length_beyond_the_context_is_one_message(tmp_path):
    model = tiny_model_dir(tmp_path / "m")
    f = rows_file(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": "2"}])
    status, out = cli("train.py", "--model", model, "--data", f, "--algo", "grpo",
                      "--max-new-tokens", "1000000000", "--generation", "static",
                      "--max-prompt-tokens", "50", "--out", tmp_path / "o")
    one_message(status, out, "exceeds", "context of 256")


def test_the_warm_start_settings_are_not_checked_as_a_users_out(tmp_path, monkeypatch):
    """From a directory without write access the warm start's internal settings (its --out
    '-') are not refused as if typed; a cache that holds the warm start is only read."""
    from engine.toy import warmstart
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.chdir(ro)
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # root ignores permissions
    cfg = config.resolve_config(dict(algo="grpo", cache_dir=str(tmp_path)), paths=False)
    built = warmstart.warm_start_path(cfg, steps=10, name="student")
    os.makedirs(built)

    def no_lock(*a, **k):  # a read-only cache: a lock file cannot be made there
        raise PermissionError("read-only file system")

    monkeypatch.setattr(warmstart, "file_lock", no_lock)
    from engine.distributed import Dist
    assert warmstart.toy_checkpoint(cfg, Dist(), steps=10, name="student") == built


# ---- low ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cell,ok", [([46, 47], False), (True, False), ({"role": "user"}, False),
                                     (float("nan"), False), (46, "46"), (46.0, "46"),
                                     (0.5, "0.5")])
def test_cells_are_text_or_numbers(tmp_path, cell, ok):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": cell}) + "\n")
    if ok:
        assert data.load_examples(str(path))[0].answer == ok
    else:
        with pytest.raises(data.DataError, match=r"c.jsonl:1: column 'answer'"):
            data.load_examples(str(path))


def test_a_chat_message_object_as_prompt_is_one_message(tmp_path):
    f = rows_file(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                          "answer": "2"}])
    status, out = cli("train.py", "--data", f, "--algo", "grpo", "--out", tmp_path / "o")
    one_message(status, out, "c.jsonl:1: column 'prompt' holds list")


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--temperature", "-1"], "--temperature must be"),
])
def test_eval_options_are_checked(args, message):
    status, out = cli("eval.py", "toy", *args)
    one_message(status, out, message)


def test_eval_of_a_run_with_a_truncated_config_is_one_message(tmp_path):
    run = tmp_path / "r"
    ck = tiny_model_dir(run / "checkpoint-000001")
    (run / "config.json").write_text('{"algo": "grpo", "rew')
    status, out = cli("eval.py", ck, "--n", "2")
    one_message(status, out, "config.json: not a readable JSON file")
    (run / "config.json").write_text(json.dumps({"algo": "grpo", "max_new_tokens": "many"}))
    status, out = cli("eval.py", ck, "--n", "2")
    one_message(status, out, "max_new_tokens = 'many' should be int")


@pytest.mark.parametrize("body,message", [('[config]\nalgo = "bogus"\n', "algo 'bogus'"),
                                          ("about = 3\n", "about = 3 should be a table"),
                                          ('config = "x"\n', "config = 'x' should be a table")])
def test_bad_recipes_are_one_message_and_the_others_still_list(tmp_path, monkeypatch, capsys,
                                                               body, message):
    (tmp_path / "bad.toml").write_text(body)
    (tmp_path / "good.toml").write_text('[config]\nalgo = "grpo"\n')
    monkeypatch.setattr(presets, "RECIPES", str(tmp_path))
    with pytest.raises(SystemExit, match=message):
        config.parse_config(["--preset", "bad"])
    listing = presets.listing(config.DEFAULTS)  # the others are still listed
    assert "good    grpo" in listing and "bad" in listing


def test_torchrun_resume_of_a_one_process_checkpoint_is_one_message(tmp_path, cache):
    out = tmp_path / "r"
    train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--algo", "grpo"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, "--cache-dir", cache, "--out", str(out),
           "--algo", "grpo", "--steps", "3", "--resume"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "written by 1 processes, this run has 2" in res.stderr
    assert "KeyError" not in res.stderr


def test_small_ones(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(data.DataError, match="nested too deeply"):
        data.load_examples(str(deep))
    csv_file = tmp_path / "long.csv"
    csv_file.write_text("prompt,answer\n1+1,2\n3+3," + "9" * 200_000 + "\n")
    with pytest.raises(data.DataError, match=r"long.csv:3: malformed CSV"):
        data.load_examples(str(csv_file))
    for args, message in ((["--seed", "100000000000000000000"], "--seed must be"),
                          (["--lora-alpha", "8"], "without --lora-rank"),
                          (["--lora-targets", "q_proj"], "without --lora-rank")):
        with pytest.raises(SystemExit, match=message):
            config.parse_config(args)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    cfg = config.parse_config(["--data", str(fifo), "--algo", "grpo"])
    assert cfg.data == str(fifo)  # it exists: no "no such file"
    msg = rundir.stopped_after(3, 2, "out dir", "SIGTERM", ["train.py", "--out", "out dir"])
    assert "continue with: python train.py --out 'out dir' --resume" in msg


def test_a_chat_template_the_sandbox_refuses_is_one_message(tmp_path):
    from engine.prompts import prompt_ids
    tok = build_toy_tokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SystemExit, match="refused by the template sandbox"):
        prompt_ids(tok, "1+1")


def test_the_gpu_suite_skips_a_section_whose_extra_is_missing(monkeypatch, capsys):
    import importlib.util
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_suite
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    suite = gpu_suite.Suite(torch.device("cpu"), gpu_suite.SIZES["tiny"])
    suite.section("memory", lambda: iter([{"what": "never"}]), needs="peft")
    suite.section("other", lambda: iter([{"what": "ran"}]))
    assert "skipped: it needs peft" in capsys.readouterr().out
    assert [r.get("what") for r in suite.rows] == [None, "ran"]


def test_the_forward_k3_is_the_releases_formula():
    """PTD-PO's compute_kl(kl_penalty="low_var_kl", kl_direction="forward_kl"): the two
    log-probs swapped, then kl = ref - logp clamped to +-20, exp(kl) - kl - 1 clamped to
    [-10, 10] (read from XszNeverSleep/PTD-PO verl/trainer/core_algos.py)."""
    import grpo
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(5, 7, generator=g) * 30, -torch.rand(5, 7, generator=g) * 30
    swapped_logp, swapped_ref = ref, logp
    kl = (swapped_ref - swapped_logp).clamp(-20.0, 20.0)
    release = torch.clamp(kl.exp() - kl - 1, min=-10.0, max=10.0)
    assert torch.equal(grpo.kl_k3(logp, ref, direction="forward"), release)
    assert not torch.equal(grpo.kl_k3(logp, ref), release)
    with pytest.raises(SystemExit, match="--kl-direction"):
        config.parse_config(["--algo", "grpo", "--kl-direction", "sideways"])
