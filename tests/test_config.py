"""Options: --help documents every flag, ignored flags are refused, booleans, the LR schedule,
the KL reference is never a moving teacher, metrics keep their own denominators."""
import contextlib
import dataclasses
import math
import os

import pytest
from hypothesis import given, strategies as st
import torch

from engine import config
import train
from engine import teachers, update
from engine.distributed import Dist
from engine.toy.models import build_toy_model, build_toy_tokenizer


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--help"])
    out = capsys.readouterr().out
    docs = config.field_help()
    for f in dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in out
        assert docs[f.name][1], f.name  # a non-empty help text for every field


@pytest.mark.parametrize("argv,message", [
    (["--algo", "rlsd", "--kl-coef", "0.1"], "--kl-coef has no effect with --algo rlsd"),
    (["--algo", "ptdpo", "--beta", "0.5"], "--beta has no effect with --algo ptdpo"),
    (["--algo", "grpo", "--lam-decay", "3"], "--lam-decay has no effect with --algo grpo"),
    (["--lr-schedule", "step"], "--lr-schedule must be"),
])
def test_flags_an_algorithm_ignores_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        config.parse_config(argv)


def test_boolean_flags():
    assert config.parse_config(["--resume"]).resume is True
    assert config.parse_config(["--resume", "true", "--steps", "3"]).resume is True
    assert config.parse_config(["--resume", "false"]).resume is False
    assert config.parse_config(["--no-resume"]).resume is False
    with pytest.raises(SystemExit):
        config.parse_config(["--resume", "maybe"])


def test_lr_schedule_hand_values():
    def lr(s, **kw):
        return update.lr_at(s, **{**dict(lr=1.0, steps=10, warmup=4, schedule="constant"), **kw})
    assert [lr(s) for s in (1, 2, 4, 10)] == [0.25, 0.5, 1.0, 1.0]
    # decay as HF's schedulers: step s (from 1) has progress (s - 1 - warmup) / (steps - warmup),
    # so the first step after warm-up has the full lr and the last is not wasted at lr 0
    assert [lr(s, schedule="linear") for s in (4, 5, 7, 10)] == pytest.approx(
        [1.0, 1.0, 4 / 6, 1 / 6])
    assert [lr(s, schedule="cosine", warmup=0, steps=5) for s in (1, 3, 5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi * 0.4)), 0.5 * (1 + math.cos(math.pi * 0.8))])


def _teachers(cfg, model, dist):
    """The run's (Teacher, reference), as train.setup builds them for a self-teacher."""
    return teachers.teacher_and_reference(model, mode=cfg.teacher_mode, kl_coef=cfg.kl_coef,
                                          sync_every=cfg.teacher_sync, ema_rate=cfg.teacher_ema,
                                          dist=dist, dtype=torch.float32)


def test_kl_reference_is_never_the_moving_teacher():
    """Audit F10: with an EMA or synced teacher and --kl-coef > 0, the reference is its own
    frozen copy, unchanged by teacher updates; a frozen teacher may share its weights."""
    tok = build_toy_tokenizer()
    dist = Dist()
    for algo, mode in (("srpo", "ema"), ("grpo", "sync")):
        model = build_toy_model(tok, seed=0)
        cfg = config.resolve_config(dict(algo=algo, model="org/x", teacher_mode=mode, kl_coef=0.1,
                                         teacher_sync=1))
        teacher, ref = _teachers(cfg, model, dist)
        assert ref is not teacher.model and ref is not model
        before = [p.detach().clone() for p in ref.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        teacher.update(model, 1)
        assert not torch.equal(next(teacher.model.parameters()), before[0])  # the teacher moved
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), before))
    cfg = config.resolve_config(dict(algo="ptdpo", model="org/x"))
    teacher, ref = _teachers(cfg, build_toy_model(tok), dist)
    assert ref is teacher.model  # frozen: one copy serves both


def test_metrics_are_means_over_their_own_denominators():
    m = update.Metrics()
    m.add({"a": (torch.tensor(3.0), torch.tensor(3)), "b": (torch.tensor(1.0), torch.tensor(1))})
    m.add({"a": (torch.tensor(1.0), torch.tensor(1)), "b": (torch.tensor(0.0), torch.tensor(9))})
    assert m.means(Dist()) == {"a": 1.0, "b": 0.1}


def test_paper_defaults_follow_the_fidelity_table():
    """config.PAPER_DEFAULTS against docs/fidelity.md ("PAPER_DEFAULTS against
    the official configurations"), on real data (the toy task rescales lengths and batches)."""
    def cfg(algo, *extra):
        return config.resolve_config(dict(algo=algo, model="org/model", data="", eval_data="",
                                          **dict(extra)))
    d = cfg("dapo")
    assert (d.group_size, d.prompts_per_step, d.dual_clip, d.weight_decay, d.lr_warmup_steps,
            d.reward, d.dapo_max_gen_batches) == (16, 512, 10.0, 0.1, 10, "dapo", 10)
    o = cfg("opsd")
    assert (o.rollout_top_p, o.rollout_top_k, o.lr_schedule, o.weight_decay, o.distill_agg,
            o.chat_template_kwargs, o.teacher_chat_template_kwargs) == (
        0.95, 20, "linear", 0.0, "seq-mean", '{"enable_thinking": false}',
        '{"enable_thinking": true}')
    s = cfg("sdpo")
    assert (s.lr_warmup_steps, s.distill_agg, s.max_teacher_prompt_tokens, s.max_prompt_tokens,
            s.chat_template_kwargs) == (10, "seq-mean-all-rows", 10240, 2048,
                                        '{"enable_thinking": false}')
    assert (cfg("srpo").lr_warmup_steps, cfg("srpo").chat_template_kwargs) == (
        10, '{"enable_thinking": false}')
    p = cfg("ptdpo")
    assert (p.rollout_top_p, p.distill_agg, p.kl_coef, p.clip_high) == (
        0.99, "micro-batch-mean", 0.01, 0.3)
    r = cfg("rlsd")
    assert (r.teacher_sync, r.lam_decay, r.reward, r.prompts_per_step) == (
        10, 50, "rlsd_format", 256)
    assert "<answer>" in r.student_template
    dr = cfg("dr_grpo")
    assert (dr.prompts_per_step, dr.max_new_tokens, dr.adv_scale) == (128, 3000, "none")


def test_opd_with_a_self_teacher():
    """OPSD's sampled-token variant: opd scored by the frozen student shown the solution."""
    c = config.parse_config(["--algo", "opd", "--teacher-mode", "frozen", "--context", "solution"])
    assert (c.teacher, c.teacher_mode) == ("", "frozen")
    with pytest.raises(SystemExit, match="needs --teacher"):
        config.parse_config(["--algo", "opd"])
    with pytest.raises(SystemExit, match="external teacher"):
        config.parse_config(["--algo", "opd", "--teacher", "toy", "--teacher-mode", "frozen"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory as far as the options are concerned: a config.json with a context."""
    tmp_path = tmp_path_factory.mktemp("model")
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", "max_position_embeddings": 32768}')
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    return tmp_path


@given(algo=st.sampled_from(["dapo", "dr_grpo", "gspo", "ptdpo"]), prompts=st.integers(1, 600),
       world=st.sampled_from([1, 2, 3, 4, 8]))
def test_paper_mini_batches_give_way_to_the_prompts_the_user_set(model_dir, algo, prompts,
                                                                 world):
    """An untyped --mini-batch-size never makes a config error: it keeps the paper's number of
    updates per rollout batch where the typed --prompts-per-step allows it, else the nearest
    number that does (whole mini-batches, whole prompts per process), and says so."""
    prompts = max(world, prompts - prompts % world)  # the user's own value divides
    notes = []
    base = ["--model", str(model_dir), "--data", str(model_dir / "train.jsonl"), "--algo", algo]
    with processes(world):
        cfg = config.resolve_config(vars_of(base + ["--prompts-per-step", str(prompts)]), notes)
    paper = config.PAPER_DEFAULTS[algo]
    want = paper.get("prompts_per_step", config.Config.prompts_per_step) / paper["mini_batch_size"]
    mini = cfg.mini_batch_size
    assert prompts % mini == 0 and mini % world == 0
    possible = [k for k in range(1, prompts + 1)
                if prompts % k == 0 and (prompts // k) % world == 0]
    assert abs(prompts // mini - want) == min(abs(k - want) for k in possible)
    assert bool(notes) == (mini != paper["mini_batch_size"])  # each change is said
    with processes(world), pytest.raises(SystemExit, match="must divide"):  # typed: an error
        config.resolve_config(vars_of(base + ["--prompts-per-step", str(prompts * 7),
                                              "--mini-batch-size", str(prompts * 7 + world)]))


@contextlib.contextmanager
def processes(world: int):
    """As if under torchrun with `world` processes (WORLD_SIZE is what config reads)."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        yield
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.update(WORLD_SIZE=old)


def vars_of(argv):
    """The command-line values (flag value pairs) parse_config passes to resolve_config."""
    return {f[2:].replace("-", "_"): type(config.DEFAULTS[f[2:].replace("-", "_")])(v)
            for f, v in zip(argv[::2], argv[1::2])}


def test_dapo_overlong_buffer_and_lengths_follow_the_user(model_dir, tmp_path):
    data = ["--data", str(model_dir / "train.jsonl"), "--algo", "dapo"]
    cfg = config.parse_config(["--model", str(model_dir), "--max-new-tokens", "1000", *data])
    assert cfg.overlong_cache == 200  # 4096 / 20480 of it, not the paper's 4096 > 1000
    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_text('{"text_config": {"max_position_embeddings": 4096}}')
    cfg = config.parse_config(["--model", str(short), *data])
    assert cfg.max_new_tokens == 2048 and cfg.overlong_cache == 410  # fits the context
    cfg = config.parse_config(["--model", str(short), "--max-new-tokens", "8000", *data])
    assert cfg.max_new_tokens == 8000  # typed: kept (prompts longer than 0 then fail, named)
    cfg = config.parse_config(["--model", str(model_dir), "--steps", "5", *data])
    assert cfg.lr_warmup_steps == 0  # the paper's 10 is longer than the run
    cfg = config.parse_config(["--model", str(model_dir), "--steps", "5", "--lr-warmup-steps",
                               "7", *data])
    assert cfg.lr_warmup_steps == 7
