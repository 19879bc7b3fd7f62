"""End to end on a tiny warm start: every algorithm, torchrun, resume, checkpoints, data files."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine import config
import train
from rounding import FirstUpdate, assert_same_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "16",
        "--eval-n", "4", "--warm-start-steps", "30", "--eval-every", "0"]


def run(tmp_path, cache, *args):
    out = str(tmp_path / "run")
    train.main(TINY + ["--cache-dir", cache, "--out", out, *args])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return out, [json.loads(line) for line in f]


@pytest.mark.parametrize("algo", [a for a in config.ALGOS if a != "opd"])
def test_every_algorithm_runs_two_steps(tmp_path, cache, algo):
    extra = ["--group-size", "1"] if algo == "opsd" else []
    out, rows = run(tmp_path, cache, "--algo", algo, *extra)
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("loss", "step_time_s", "grad_norm"):
            assert key in r and r[key] == r[key], (algo, key)  # present and not NaN
        if algo != "sft":
            assert {"reward_mean", "entropy", "response_len_mean", "time_rollout_s",
                    "time_fwd_bwd_s", "time_optimizer_s"} <= set(r)
    assert "test_acc" in rows[0] and "test_acc" in rows[-1]
    if algo == "rlsd":
        assert rows[1]["rlsd_lambda"] == pytest.approx(0.5 * 49 / 50)
        assert 0.0 <= rows[1]["rlsd_weight_clip_frac"] <= 1.0
    if algo in ("srpo", "ptdpo", "sdpo", "opsd"):
        assert 0.0 <= rows[1]["distilled_frac"] <= 1.0
    ck = os.path.join(out, "checkpoint-000002")
    assert os.path.exists(os.path.join(ck, "model.safetensors"))


def test_opd_with_external_toy_teacher(tmp_path, cache):
    _, rows = run(tmp_path, cache, "--algo", "opd", "--teacher", "toy")
    assert "opd_reverse_kl" in rows[1]


def test_checkpoint_loads_with_from_pretrained(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _ = run(tmp_path, cache, "--algo", "grpo")
    ck = os.path.join(out, "checkpoint-000002")
    model = AutoModelForCausalLM.from_pretrained(ck)
    tok = AutoTokenizer.from_pretrained(ck)
    saved = load_file(os.path.join(ck, "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved.get(k, saved["model.embed_tokens.weight"]))
    assert tok.decode(tok("12+3")["input_ids"]) == "12+3"


SEQ = 32  # the longest prompt + response of TINY's rows (tests/rounding.py)


def first_updates(tmp_path, cache, monkeypatch, common, one, other, rows=False):
    """The first optimizer update of two one-step runs that differ in `one` / `other`, each
    with one-row micro-batches unless it sets its own split (tests/rounding.py: the bound
    needs each row's contribution). Groups of 4 and a reward that varies with every token
    (signal_reward.py): advantages that are not all 0. With rows, also the step-1 metrics."""
    out = []
    for name, extra in (("a", one), ("b", other)):
        split = () if "--micro-batch-size" in (*common, *one, *other) else (
            "--micro-batch-size", "1")
        rec = FirstUpdate(monkeypatch)
        _, metrics = run(tmp_path / name, cache, "--group-size", "4", *common, *extra, *split,
                         "--steps", "1", "--reward", "signal_reward:parity")
        monkeypatch.undo()
        out.append((rec, metrics[1]) if rows else rec)
    return out


def _train_rows(rows):
    """Training metrics without wall-clock timings (`*_s`) or evaluations (`*_acc`, `*_leakage`)."""
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "_acc", "_leakage"))}
            for r in rows if r["step"] > 0]


@pytest.mark.parametrize("algo", ["rlsd", "srpo"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, cache, algo):
    # a constant rate: the stopped run has --steps 2, and a decay depends on --steps
    extra = ["--teacher-sync", "3", "--lr-schedule", "constant"] + (
        ["--lam-decay", "3"] if algo == "rlsd" else [])
    args = ["--algo", algo, "--steps", "4", *extra]
    full, rows_full = run(tmp_path / "a", cache, *args)
    part = str(tmp_path / "b")
    train.main(TINY + ["--cache-dir", cache, "--out", part, "--algo", algo,
                       *extra])  # stops after step 2 with a checkpoint
    train.main(TINY + ["--cache-dir", cache, "--out", part, *args, "--resume", "true"])
    with open(os.path.join(part, "metrics.jsonl")) as f:
        rows_part = [json.loads(line) for line in f]
    assert _train_rows(rows_part) == _train_rows(rows_full)
    a = load_file(os.path.join(full, "checkpoint-000004", "model.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(tmp_path, cache):
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "x"), "--resume", "true"])


def _toy_rows_as_file(tmp_path, fmt):
    from engine.toy import arithmetic
    rows = [dict(question=e.prompt, answer=e.answer, solution=e.solution, hint=e.hint)
            for e in arithmetic.make_toy("train", 12)]
    if fmt == "jsonl":
        f = tmp_path / "train.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        f = tmp_path / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), str(f))
    return str(f)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_training_on_a_data_file(tmp_path, cache, fmt):
    f = _toy_rows_as_file(tmp_path, fmt)
    _, rows = run(tmp_path, cache, "--algo", "ptdpo", "--data", f, "--eval-data", f,
                  "--prompt-key", "question")
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_acc" in rows[-1]


def test_bad_configs_fail_before_training(tmp_path, cache):
    with pytest.raises(SystemExit, match="needs --teacher"):
        config.parse_config(["--algo", "opd"])
    with pytest.raises(SystemExit, match="group-size must be >= 2"):
        config.parse_config(["--algo", "grpo", "--group-size", "1"])
    with pytest.raises(SystemExit):
        config.parse_config(["--algo", "ppo"])
    with pytest.raises(SystemExit, match="--generation must be one of"):
        config.parse_config(["--generation", "paged"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"):
            config.parse_config(["--generation", "compiled"])
    f = tmp_path / "no_solution.jsonl"
    f.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--cache-dir", cache, "--algo", "opsd", "--data", str(f),
                           "--out", str(tmp_path / "o")])
    assert e.value.code == 2


# synced, EMA, frozen teachers; the static KV cache under FSDP2 once
@pytest.mark.parametrize("algo,generation,extra", [
    ("rlsd", "dynamic", []), ("sdpo", "dynamic", []),
    ("ptdpo", "static", ["--mini-batch-size", "2"]),  # two updates per batch, 1 prompt per rank
    ("opsd", "dynamic", ["--lora-rank", "4"])])  # FSDP2 + LoRA, the teacher is the adapters-off base
def test_torchrun_two_processes(tmp_path, cache, algo, generation, extra):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, "--algo", algo, "--cache-dir", cache,
           "--out", out, "--generation", generation, *extra]
    if algo == "rlsd":
        cmd += ["--teacher-sync", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1, 2]
    weights = "adapter_model.safetensors" if "--lora-rank" in extra else "model.safetensors"
    assert os.path.exists(os.path.join(out, "checkpoint-000002", weights))


@pytest.mark.parametrize("extra,n", [([], 35), (["--gradient-checkpointing"], 35),
                                     (["--lora", "--gradient-checkpointing"], 42)])
def test_chunked_lm_head_gradient_under_fsdp_matches_one_process(extra, n):
    """The LM head applied per chunk of positions outside the model's forward, under FSDP2
    with 2 processes (and with every decoder layer recomputed in backward; with LoRA: its 42
    adapter matrices), gives the single-process full-logits gradient for every parameter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "fsdp_grad_check.py"), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"rank 0: {n} gradients match" in res.stdout and f"rank 1: {n} gradients match" in res.stdout


@pytest.mark.parametrize("algo", ["grpo", "rlsd", "srpo", "ptdpo", "opsd"])
def test_chunked_logits_equal_full_logits(tmp_path, cache, monkeypatch, algo):
    """--logit-chunk 3 (LM head per 3 positions, recomputed in backward) vs -1 (all at once):
    the same first update, within float32 rounding (tests/rounding.py)."""
    extra = ["--group-size", "1"] if algo == "opsd" else []
    a, b = first_updates(tmp_path, cache, monkeypatch, ("--algo", algo, *extra),
                         ("--logit-chunk", "3"), ("--logit-chunk", "-1"))
    assert_same_update(a, b, seq_len=SEQ)


def test_static_cache_generation_trains_like_dynamic(tmp_path, cache, monkeypatch):
    """--generation static samples the same tokens, and the first update is the same."""
    (a, ra), (b, rb) = first_updates(tmp_path, cache, monkeypatch, ("--algo", "rlsd"),
                                     ("--generation", "static"), (), rows=True)
    for k in ("reward_mean", "response_len_mean", "tokens"):
        assert ra[k] == rb[k], k  # the same sampled tokens
    assert_same_update(a, b, seq_len=SEQ)


def test_lr_schedule_resumes_exactly(tmp_path, cache):
    """Warm-up then cosine decay (a function of the step and --steps): a run resumed from its
    step-2 checkpoint takes the same learning rates, so it ends in the same weights."""
    import shutil
    args = ["--algo", "grpo", "--steps", "4", "--lr-schedule", "cosine", "--lr-warmup-steps",
            "2", "--save-every", "2"]
    full, rows_full = run(tmp_path / "a", cache, *args)
    part = str(tmp_path / "b" / "run")
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoint-000004"))  # as if stopped after step 2
    _, rows_part = run(tmp_path / "b", cache, *args, "--resume")
    assert _train_rows(rows_part) == _train_rows(rows_full)
    a = load_file(os.path.join(full, "checkpoint-000004", "model.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo", ["grpo", "sdpo", "rlsd", "ptdpo", "gspo"])
def test_mini_batches_and_epochs_make_the_ratio_work(tmp_path, cache, monkeypatch, algo):
    """--mini-batch-size 2 of 4 prompts, --ppo-epochs 2: four optimizer steps per rollout
    batch; the old log-probs are the rollout policy's, so after the first update the ratio
    leaves 1 (and SDPO's IS weight with it); and the gradient does not depend on the
    micro-batch split (the first update's, within float32 rounding: tests/rounding.py)."""
    # SDPO: every rollout counts as a success, so that the tiny warm start has siblings to show
    sdpo = ("--success-threshold", "-1") if algo == "sdpo" else ()
    args = ("--algo", algo, "--mini-batch-size", "2", "--ppo-epochs", "2", "--lr", "3e-3", *sdpo)
    (a, ra), (b, _) = first_updates(tmp_path, cache, monkeypatch, args, (),
                                    ("--micro-batch-size", "1"), rows=True)
    assert_same_update(a, b, seq_len=SEQ)
    ratio = "is_weight_mean" if algo == "sdpo" else "ratio_mean"  # SDPO has no PPO ratio
    assert ra["updates"] == 4.0
    assert ra[ratio] != 1.0 and ra[ratio] > 0.5  # measured on real tokens, and moved
    _, one = run(tmp_path / "c", cache, "--algo", algo, *sdpo, "--steps", "1",
                 "--mini-batch-size", "4")  # one mini-batch (GSPO's default splits in 4)
    assert one[1]["updates"] == 1.0 and one[1][ratio] == 1.0  # on-policy: exactly 1


def test_one_mini_batch_is_the_default_step(tmp_path, cache):
    """--mini-batch-size equal to --prompts-per-step is the plain one-step update, bit for bit."""
    _, a = run(tmp_path / "a", cache, "--algo", "rlsd")
    _, b = run(tmp_path / "b", cache, "--algo", "rlsd", "--mini-batch-size", "4")
    assert _train_rows(a) == _train_rows(b)


def test_gradient_checkpointing_trains_like_plain(tmp_path, cache, monkeypatch):
    """--gradient-checkpointing recomputes each layer in backward: the same first update."""
    a, b = first_updates(tmp_path, cache, monkeypatch, ("--algo", "rlsd"),
                         ("--gradient-checkpointing",), ())
    assert_same_update(a, b, seq_len=SEQ)


def test_released_ptdpo_updates_exactly_as_without_its_ptd_term(tmp_path, cache, monkeypatch):
    """The released PTD term's gradient is exactly zero (tests/test_distill.py), so at the
    trainer level PTD-PO as released takes the same first update, to the bit, with --ptd-coef
    0.05 as with 0: GRPO with the reference KL off on hinted groups. The exact JSD does not."""
    args = ("--algo", "ptdpo", "--top-k", "5")
    (released, metrics), (off, _) = first_updates(
        tmp_path, cache, monkeypatch, args, ("--ptd-coef", "0.05"), ("--ptd-coef", "0"), rows=True)
    assert metrics["distilled_frac"] > 0 and metrics["distill"] > 0  # the term was there
    assert all(torch.equal(released.grads[n], off.grads[n]) for n in off.grads)
    exact, _ = first_updates(tmp_path / "exact", cache, monkeypatch, args,
                             ("--ptd-divergence", "jsd-exact"), ("--ptd-coef", "0"))
    assert any(not torch.equal(exact.grads[n], off.grads[n]) for n in off.grads)
