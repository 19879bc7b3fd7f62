"""study.py and its control arm: unrelated privileged contexts, the report, resuming, --check."""
import json
import os

import pytest
import torch
from hypothesis import given, strategies as st

from engine import batch, config
from engine.toy import arithmetic
from tools import study

TINY = "--prompts-per-step 4 --group-size 2 --max-new-tokens 16 --eval-n 4 --warm-start-steps 30"


@given(n_groups=st.integers(1, 6), group=st.integers(1, 4), pool=st.integers(2, 30),
       seed=st.integers(0, 10**6))
def test_unrelated_contexts_swap_every_privileged_field_and_keep_the_question(n_groups, group,
                                                                              pool, seed):
    exs = arithmetic.make_toy("train", pool)
    rows = [exs[i % pool] for i in range(n_groups) for _ in range(group)]
    state = torch.random.get_rng_state()
    out = batch.unrelated_contexts(rows, exs, group_size=group, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # the sampling RNG is untouched
    assert len(out) == len(rows)
    for i, (e, o) in enumerate(zip(rows, out)):
        assert o.prompt == e.prompt  # the question the student answers
        assert o is out[i - i % group]  # one donor per group
        donors = [d for d in exs if (d.answer, d.solution, d.hint, d.rationale)
                  == (o.answer, o.solution, o.hint, o.rationale)]
        assert donors and any((d.prompt, d.answer) != (e.prompt, e.answer) for d in donors)
    assert out == batch.unrelated_contexts(rows, exs, group_size=group, seed=seed)  # seeded


def test_context_source_is_validated(tmp_path):
    with pytest.raises(SystemExit, match="context-source"):
        config.parse_config(["--algo", "sdpo", "--context-source", "other"])
    with pytest.raises(SystemExit, match="context-source"):
        config.parse_config(["--algo", "rlsd", "--context-source", "theirs"])


def test_teacher_prompts_of_the_control_show_another_problems_answer(tmp_path, cache,
                                                                    monkeypatch):
    import train
    seen = []
    real = batch.teacher_prompts

    def spy(tok, b, **kw):
        seen.append((b.examples, kw["shown"], tok))
        return real(tok, b, **kw)

    monkeypatch.setattr(batch, "teacher_prompts", spy)
    train.main(TINY.split() + ["--algo", "rlsd", "--context-source", "other", "--steps", "1",
                               "--eval-every", "0", "--cache-dir", cache,
                               "--out", str(tmp_path / "run")])
    (rows, shown, tok), = seen
    assert len(shown) == len(rows)
    assert all(s.prompt == r.prompt and s.answer != r.answer for r, s in zip(rows, shown))


def _rows(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_study_runs_reports_resumes_and_checks(tmp_path, cache, capsys):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    flags = ["--arms", "grpo,rlsd,rlsd_unrelated", "--seeds", "0,1", "--steps", "2",
             "--runs", runs, "--out", out, "--train-flags", f"{TINY} --cache-dir {cache}"]
    study.main(flags)
    text = open(os.path.join(out, "RESULTS.md")).read()
    for arm in ("| grpo | 2 |", "| rlsd | 2 |", "| rlsd_unrelated | 2 |", "Paired RLSD - GRPO",
                "seed 0: student", "seed 1: student", "RLSD's weight clip while lambda > 0"):
        assert arm in text
    assert os.path.exists(os.path.join(out, "test_acc.png"))
    # the archive of the metrics rebuilds the same report on its own
    archived = os.path.join(out, "runs")
    assert sorted(os.listdir(os.path.join(archived, "rlsd", "seed1"))) == ["config.json",
                                                                        "metrics.jsonl"]
    study.main(flags[:6] + ["--runs", archived, "--out", str(tmp_path / "again"), "--report"])
    again = open(str(tmp_path / "again" / "RESULTS.md")).read()
    assert again.replace(archived, runs) == text
    with open(os.path.join(runs, "study_time.jsonl")) as f:  # one line per process, timed
        timed = [json.loads(line) for line in f]
    # seed 1's warm start is built first (seed 0's is the cached one), then the six runs
    assert [(t["arm"], t["seed"]) for t in timed[:1]] == [("warm start (student)", 1)]
    assert sorted((t["arm"], t["seed"]) for t in timed[1:]) == sorted(
        (a, s) for s in (0, 1) for a in ("grpo", "rlsd", "rlsd_unrelated"))
    assert all(t["rc"] == 0 for t in timed)
    assert "h wall time" in text and "summed over processes" in text
    # the control changes only what the teacher sees: the same rollouts at step 1 (the
    # sampling RNG is the same; what the teacher sees: test_teacher_prompts_of_the_control)
    own, other = (_rows(study.run_dir(runs, a, 0)) for a in ("rlsd", "rlsd_unrelated"))
    for key in ("reward_mean", "response_len_mean", "entropy"):
        assert own[1][key] == other[1][key]
    # finished runs are reused: a second call runs nothing
    log = open(os.path.join(runs, "study.log")).read()
    study.main(flags)
    assert open(os.path.join(runs, "study.log")).read() == log
    # rerunning the first steps reproduces the logged metrics exactly
    with pytest.raises(SystemExit) as e:
        study.main(flags + ["--check", "rlsd_unrelated:1"])
    assert e.value.code == 0
    assert "every metric identical" in capsys.readouterr().out
    # the archive carries each seed's warm start (weights, config, tokenizer, not the SFT's
    # optimizer) and the environment; a check from it starts from those weights
    assert sorted(os.listdir(os.path.join(archived, "warm"))) == ["seed0", "seed1"]
    assert "model.safetensors" in os.listdir(os.path.join(archived, "warm", "seed1"))
    assert "trainer_state.pt" not in os.listdir(os.path.join(archived, "warm", "seed1"))
    assert os.path.exists(os.path.join(out, "forest.png"))
    with pytest.raises(SystemExit) as e:
        study.main(flags[:6] + ["--runs", archived, "--out", str(tmp_path / "again"),
                                "--train-flags", f"{TINY} --cache-dir {tmp_path / 'empty'}",
                                "--check", "rlsd:1"])
    printed = capsys.readouterr().out
    assert "starting from the archived warm start" in printed
    assert "environment the same as the archive's" in printed
    assert e.value.code == 0 and "every metric identical" in printed
    assert not os.path.exists(tmp_path / "empty")  # nothing was rebuilt


def test_check_names_the_environment_and_the_first_deviation(tmp_path, monkeypatch, capsys):
    """A check on another machine: the differing library versions, then the first metric that
    differs and by how much (rounding is ~1e-7, a bug usually more)."""
    runs = tmp_path / "runs"
    os.makedirs(study.run_dir(str(runs), "grpo", 0))
    (runs / "environment.json").write_text(json.dumps({**study.environment(),
                                                       "transformers": "0.0.1"}))
    logged = [{"step": 1, "loss": 0.25, "reward_mean": 0.5}]
    with open(os.path.join(study.run_dir(str(runs), "grpo", 0), "metrics.jsonl"), "w") as f:
        f.write(json.dumps(logged[0]) + "\n")

    class Done:  # the rerun: it logged step 1 with a slightly different loss
        def __init__(self, cmd, **kw):
            out = cmd[cmd.index("--out") + 1]
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"step": 1, "loss": 0.25000003, "reward_mean": 0.5}) + "\n")

        def poll(self):
            return 0

        def terminate(self):
            pass

        def wait(self):
            return 0
    monkeypatch.setattr(study.subprocess, "Popen", Done)
    monkeypatch.setattr(study, "opd_teacher_path", lambda *a, **k: "unused")
    assert study.check("grpo:0", str(runs), first=1) == 1
    printed = capsys.readouterr().out
    assert "environment differs from the archive's: transformers 0.0.1 -> " in printed
    assert "the first at step 1: loss logged 0.25, rerun 0.25000003 (relative difference 1.2e-07)" \
        in printed


def test_wall_time_is_the_union_of_the_processes_intervals():
    spans = [{"start": 0, "minutes": 60}, {"start": 1800, "minutes": 60},  # overlap 30 min
             {"start": 3 * 3600, "minutes": 30}]                          # after a gap
    assert study.wall_hours(spans) == pytest.approx(2.0)
    assert study.wall_hours([]) == 0


def test_paired_difference_and_its_t_interval_by_hand():
    summ = {"rlsd": {0: {"final": 0.52}, 1: {"final": 0.54}, 2: {"final": 0.50}},
            "grpo": {0: {"final": 0.50}, 1: {"final": 0.50}, 2: {"final": 0.50}}}
    # differences +2, +4, 0 points: mean 2, std 2, half-width t(0.975, 2) * 2 / sqrt(3) = 4.97
    text = study.paired(summ, "rlsd", "grpo")
    assert "+2.0 points, 95% CI [-3.0, +7.0]" in text and "+2.0, +4.0, +0.0" in text
    assert "needs two seeds" in study.paired({"rlsd": {0: {"final": 1}}, "grpo": {}}, "rlsd", "grpo")
    assert study.mean_std([0.4, 0.45, 0.5], pct=True) == "45.0 ± 5.0"


def test_the_table_caption_names_each_tasks_evaluation_steps():
    """'steps to GRPO's final' counts evaluations, so the caption states the task's own schedule."""
    assert study.eval_schedule("toy") == "every 25 steps"
    assert study.eval_schedule("chains") == "at steps 10, 20, 30, 40 and every 25 steps"
    assert study.eval_schedule("clips") == "every 50 steps"


def test_a_metric_no_run_logged_gets_no_plot(tmp_path):
    """clips logs no leakage: the report draws accuracy and entropy, and no empty leakage plot."""
    rows = [{"step": s, "test_acc": 0.5, "entropy": 0.1} for s in (0, 50)]
    study.plots({"grpo": {0: rows, 1: rows}}, str(tmp_path))
    assert {"test_acc.png", "entropy.png"} <= set(os.listdir(tmp_path))
    assert "leakage.png" not in os.listdir(tmp_path)


def test_the_ablation_table_is_the_mean_over_seeds_of_the_saved_evaluations(tmp_path):
    """The clips ablation table from `eval.py --out` files: per arm, seeds averaged by hand."""
    def save(name, both, rest=0.5):
        lines = [{"split": s, "pass@1_greedy": rest} for s in ("test", "test/video", "test/audio")]
        lines.append({"split": "test/both", "pass@1_greedy": both})
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    save("opsd_answer-0-none.jsonl", 0.2)
    save("opsd_answer-1-none.jsonl", 0.4)
    save("opsd_answer-0-video.jsonl", 0.1)
    save("opsd_answer-1-video.jsonl", 0.2)
    save("grpo-0-none.jsonl", 0.9)  # no video-removed file: no row
    table = study.ablation_table(str(tmp_path)).splitlines()
    assert table[2:] == ["| opsd_answer | 2 | 50.0 | 50.0 | 50.0 | 30.0 | 15.0 |"]
    assert study.ablation_table(str(tmp_path / "absent")) == ""
