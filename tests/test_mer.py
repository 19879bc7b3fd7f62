"""MER-UniBench from the user's own copy (engine/mer.py), on a synthetic directory in exactly
the benchmark's layout: a label*.npz of {split}_corpus dicts, video/NAME.mp4, audio/NAME.wav
(16 kHz) and a subtitle CSV. The loader, the safe unpickling of the labels, every bad input as
one message, the metrics against hand-computed values, and train / eval / --dry-run on it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import train
from engine import mer
from engine.toy import models
from test_media import write_mp4, write_wav, tone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"train": {"a1": {"emo": "happy", "val": 2.0}, "a2": {"emo": "angry", "val": -1.5},
                    "a3": {"emo": "sad", "val": -2.0}, "a4": {"emo": "worried", "val": -0.5}},
          "test": {"b1": {"emo": "surprise", "val": 1.0}, "b2": {"emo": "neutral", "val": 0.0}}}


def mer_dir(root, labels=LABELS, videos=None, csv=True):
    """A MER-UniBench-layout directory: labels, one 2-second clip and track per name."""
    (root / "video").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    np.savez(root / "label-mer2023.npz", **{f"{s}_corpus": v for s, v in labels.items()})
    names = [n for split in labels.values() for n in split]
    for i, n in enumerate(names if videos is None else videos):
        write_mp4(root / "video" / f"{n}.mp4", [(200, 20 * i, 30)] * 4, fps=2)
        write_wav(root / "audio" / f"{n}.wav", tone(330 + 50 * i, 2.0))
    if csv:
        (root / "subtitle.csv").write_text("name,chinese,english\n" + "".join(
            f"{n},中文,I said number {i}\n" for i, n in enumerate(names)), encoding="utf-8")
    return str(root)


def test_the_layout_becomes_rows(tmp_path):
    d = mer_dir(tmp_path)
    rows = mer.load(f"mer-unibench:{d}:train")
    assert [r.answer for r in rows] == ["happy", "angry", "sad", "worried"]
    assert rows[0].prompt == 'The subtitle says: "I said number 0". ' + mer.EMOTION_QUESTION
    assert rows[0].videos[0].endswith("video/a1.mp4") and rows[0].audios[0].endswith("a1.wav")
    assert [r.answer for r in mer.load(f"mer-unibench:{d}")] == ["surprise", "neutral"]  # test
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"name": n, "rationale": f"cue {n}"})
                                              + "\n" for n in ("a1", "a2", "a3", "a4")))
    rows = mer.load(f"mer-unibench:{d}:train", rationales=str(tmp_path / "r.jsonl"))
    assert [r.rationale for r in rows] == ["cue a1", "cue a2", "cue a3", "cue a4"]


def test_meld_indices_iemocap_whole_corpus_and_sentiment(tmp_path):
    meld = mer_dir(tmp_path / "meld", {"test": {"m1": {"emo": 1}, "m2": {"emo": 4}}})
    assert [r.answer for r in mer.load(f"mer-unibench:{meld}")] == ["happy", "disgust"]
    iemocap = mer_dir(tmp_path / "iem", {"whole": {"i1": {"emo": "ang"}, "i2": {"emo": "neu"}}})
    assert [r.answer for r in mer.load(f"mer-unibench:{iemocap}")] == ["angry", "neutral"]
    cmu = mer_dir(tmp_path / "cmu", {"test": {"c1": {"val": 2.4}, "c2": {"val": -0.6},
                                              "c3": {"val": 0.0}}})
    rows = mer.load(f"mer-unibench:{cmu}")
    assert [r.answer for r in rows] == ["positive", "negative", "neutral"]
    assert rows[0].prompt.endswith(mer.SENTIMENT_QUESTION)


def test_bad_inputs_are_one_message_naming_the_file_and_name(tmp_path):
    d = mer_dir(tmp_path / "a", videos=["a1", "a2", "a3", "b1", "b2"])  # no video for a4
    with pytest.raises(data.DataError, match=r"label-mer2023.npz: train a4: no video/a4"):
        mer.load(f"mer-unibench:{d}:train")
    with pytest.raises(data.DataError, match=r"no split 'dev' \(it has test, train\)"):
        mer.load(f"mer-unibench:{d}:dev")
    bad = tmp_path / "b"
    mer_dir(bad)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "label-x.npz").write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="label-x.npz: not a MER-UniBench label file"):
        mer.load(f"mer-unibench:{tmp_path / 'c'}")
    (tmp_path / "r.csv").write_text("name,rationale\na1,x\n")
    with pytest.raises(data.DataError, match=r"r.csv: no rationale for .*train a2"):
        mer.load(f"mer-unibench:{bad}:train", rationales=str(tmp_path / "r.csv"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch RAN",))


def test_a_label_file_that_would_run_code_is_refused_unrun(tmp_path, monkeypatch):
    d = tmp_path / "x"
    mer_dir(d)
    arr = np.empty((), dtype=object)
    arr[()] = {"b1": {"emo": _Payload()}}
    np.savez(d / "label-mer2023.npz", test_corpus=arr)  # a pickle that calls os.system
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match=r"label-mer2023.npz: not a MER-UniBench label.*"
                                             r"system is not data"):
        mer.load(f"mer-unibench:{d}")
    assert not (tmp_path / "RAN").exists()


def test_metrics_against_hand_computed_values():
    ex = [data.Example(prompt="x " + mer.EMOTION_QUESTION, answer=a)
          for a in ("happy", "angry", "sad", "worried")]
    texts = ["She is joyful.", "Angry and sad", "calm", "anxious, a bit scared"]
    m = mer.metrics(texts, ex)
    assert m == {"hit_rate": 3 / 4}  # joyful -> happy; angry; (calm is neutral); anxious
    sent = [data.Example(prompt=mer.SENTIMENT_QUESTION, answer=a)
            for a in ("positive", "positive", "negative", "negative", "neutral")]
    m = mer.metrics(["positive", "negative", "negative", "it is negative", "positive"], sent)
    # gold +1 +1 -1 -1 (the neutral one excluded), pred +1 -1 -1 -1: accuracy 3/4;
    # F1(+1) = 2*1/(2*1+0+1) = 2/3, F1(-1) = 2*2/(2*2+1+0) = 4/5, weighted (2, 2) / 4
    assert m["sentiment_acc"] == 3 / 4
    assert m["sentiment_weighted_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    wheel = {"joyful": "joy", "happy": "joy", "angry": "anger", "sad": "sadness"}
    m = mer.metrics(["happy and sad", "angry"], ex[:2], wheel=wheel)
    # row 1: pred {joy, sadness}, gold {joy}: P 1/2, R 1, F 2/3; row 2: F 1
    assert m["f_s"] == pytest.approx((2 / 3 + 1) / 2)


def _cli(*args):
    res = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return res.returncode, res.stdout + res.stderr


def test_the_recipe_dry_runs_and_a_tiny_thinker_trains_and_evaluates(tmp_path):
    d = mer_dir(tmp_path / "mer")
    (tmp_path / "r.csv").write_text("name,rationale\n" + "".join(
        f"{n},the voice rises\n" for n in ("a1", "a2", "a3", "a4", "b1", "b2")))
    status, out = _cli(os.path.join(ROOT, "train.py"), "--preset", "omniopsd-qwen2.5-omni-7b",
                       "--data", f"mer-unibench:{d}", "--rationales", tmp_path / "r.csv",
                       "--dry-run")
    assert status == 0 and "parameters:" in out, out[-3000:]
    omni = models.save_toy(*models.toy_omni(), str(tmp_path / "omni"))
    run = tmp_path / "run"
    train.main(["--algo", "opsd", "--context", "rationale", "--model", omni, "--data",
                f"mer-unibench:{d}:train", "--rationales", str(tmp_path / "r.csv"),
                "--steps", "1", "--prompts-per-step", "2", "--group-size", "1",
                "--max-new-tokens", "4", "--student-template", "", "--eval-data", "",
                "--reward", "verifier", "--out", str(run), "--max-teacher-prompt-tokens", "64"])
    status, out = _cli(os.path.join(ROOT, "eval.py"), run / "checkpoint-000001", "--data",
                       f"mer-unibench:{d}:test", "--max-new-tokens", "4")
    assert status == 0, out[-3000:]
    line = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    assert line["n"] == 2 and 0.0 <= line["hit_rate"] <= 1.0
