"""clips.py: the embedded omni task's frames and sound say what its solutions say, and neither
alone gives the answer; the demonstrator that does not listen counts only silent seconds;
`python train.py --data clips` runs OmniOPSD (the rationale-shown teacher) and RLSD on the tiny
Qwen2.5-Omni thinker with no downloads."""
import io
import json
import os
import random
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from engine import media, vision
from engine.toy import clips, models


def _seconds_seen(ex) -> list:
    """Each second's colour letter and clock, read from the clip's frames."""
    out = []
    frames = ex.videos[0]["frames"]
    assert len(frames) == clips.SECONDS * clips.FPS and ex.videos[0]["fps"] == clips.FPS
    for k in range(clips.SECONDS):
        a, b = (np.asarray(Image.open(io.BytesIO(f)).convert("RGB")).astype(int)
                for f in frames[k * clips.FPS:(k + 1) * clips.FPS])
        assert np.array_equal(a, b)  # a second's frames are one picture
        colour = min(clips.CHARS, key=lambda c: np.abs(a[0, -1] - np.array(clips.COLOURS[c])).sum())
        assert np.abs(a[0, -1] - np.array(clips.COLOURS[colour])).max() <= 20
        out.append((colour, int(a[-1, 0, 0])))
    return out


def _seconds_heard(ex) -> list:
    """Each second's loudness in the middle of its tone's span, from the decoded track."""
    x, rate = media.read_audio(ex.audios[0])
    assert rate == 16000 and len(x) == clips.SECONDS * rate
    return [float(np.abs(x[k * rate + rate // 5:k * rate + 4 * rate // 5]).max())
            for k in range(clips.SECONDS)]


def test_frames_and_sound_say_what_the_solutions_say():
    rng = random.Random(0)
    for k in range(60):
        ex, colours, tones = clips.clips_example(rng, ood=k % 3 == 0)
        seen = _seconds_seen(ex)
        assert [c for c, _ in seen] == colours
        assert [g for _, g in seen] == [255 * s // clips.SECONDS for s in range(1, clips.SECONDS + 1)]
        loud = _seconds_heard(ex)
        assert all((v > 0.4) == (t >= 0) and (v < 1e-4 or t >= 0) for v, t in zip(loud, tones))
        kind = clips.kind_of(ex)
        colour = ex.prompt[0] if kind != "audio" else None
        shown = "".join(str(s) for s, c in enumerate(colours, 1) if c == colour)
        sounding = "".join(str(s) for s, v in enumerate(loud, 1) if v > 0.4)
        listed = {"video": shown, "audio": sounding,
                  "both": "".join(s for s in shown if s in sounding)}[kind]
        assert (ex.hint, ex.rationale, ex.solution) == (shown, sounding, f"{listed}={len(listed)}")
        assert ex.answer == str(len(listed)) and data.is_correct(ex.solution, ex.answer)
    kinds = [clips.kind_of(clips.clips_example(rng)[0]) for _ in range(300)]
    assert all(60 < kinds.count(k) < 140 for k in clips.KINDS)  # a third each


def test_neither_the_frames_nor_the_sound_alone_give_the_answer():
    """Over the test split, the answer is not a function of what the frames say (the hint) nor
    of what the sound says (the rationale): some two rows agree on one and not on the answer."""
    test = clips.make_clips("test", 300)
    for view in (lambda e: (e.prompt, e.hint), lambda e: e.rationale):
        answers = {}
        for e in test:
            answers.setdefault(view(e), set()).add(e.answer)
        assert any(len(a) > 1 for a in answers.values())


def test_splits_are_fixed_and_disjoint():
    key = lambda e: (tuple(e.videos[0]["frames"]), e.audios[0], e.prompt)  # noqa: E731
    train_set = {key(e) for e in clips.make_clips("train", 2000)}
    test = clips.make_clips("test", 200)
    assert len({key(e) for e in test}) == 200 and not train_set & {key(e) for e in test}
    # out of distribution: the asked colour (or, on a sound question, a tone) in 3-4 seconds
    assert all(len(e.rationale if clips.kind_of(e) == "audio" else e.hint) >= 3
               for e in clips.make_clips("ood", 50))


def test_the_demonstrator_that_does_not_listen_counts_only_silent_seconds():
    """On a both question, slipping always counts every second that shows the colour (it
    does not listen); a question on one modality it answers right whatever the slip."""
    rng = random.Random(1)
    for e in clips.make_clips("train", 300):
        assert clips.careless_solution(e, rng, 0.0) == e.solution
        careless = f"{e.hint}={len(e.hint)}" if clips.kind_of(e) == "both" else e.solution
        assert clips.careless_solution(e, rng, 1.0) == careless


def test_teach_towers_trains_both_towers_only():
    model, tok = models.toy_omni(seed=0, hidden=32, layers=1, head_dim=16)
    language = {n: p.clone() for n, p in model.model.language_model.named_parameters()}
    acc = clips.teach_towers(model, tok, steps=150, seed=0, batch=4)
    # chance: colour 0.25, second 0.25, tone about 0.6 (silence is the commoner token)
    assert acc["colour"] > 0.9 and acc["tone"] > 0.9 and acc["audio_second"] > 0.9
    assert acc["video_second"] > 0.5  # measured 1.0 / 1.0 / 1.0 / 0.81
    for n, p in model.model.language_model.named_parameters():
        assert torch.equal(p, language[n]), n


def test_train_py_runs_omniopsd_and_rlsd_on_the_clips_task(tmp_path, monkeypatch):
    """The tiny thinker warm-started on the task (towers taught for 40 steps, 20 SFT steps
    here), then OPSD with the rationale-shown teacher and RLSD; evaluated on the task's splits;
    an Omni thinker checkpoint whose towers the run left as the warm start had them."""
    monkeypatch.setattr(clips, "teach_towers", partial(clips.teach_towers, steps=40, batch=4))
    cache = str(tmp_path / "cache")
    for algo, extra in (("opsd", ["--context", "rationale", "--group-size", "1"]), ("rlsd", [])):
        out = str(tmp_path / algo)
        train.main(["--data", "clips", "--algo", algo, "--steps", "2", "--prompts-per-step", "4",
                    "--group-size", "2", "--eval-n", "4", "--warm-start-steps", "20",
                    "--cache-dir", cache, "--out", out, *extra])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert {"test_acc", "ood_acc", "test_teacher_acc"} <= set(rows[0]) <= set(rows[-1])
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["freeze_towers"] and cfg["max_new_tokens"] == 12
        # every pass's media tokens per row, logged: 4 s of video and of sound in every clip
        assert rows[1]["media_tokens_video"] > 0 and rows[1]["media_tokens_audio"] > 0
    (warm,) = [d for d in os.listdir(cache) if d.startswith("clips-student-") and "." not in d]
    before, _ = vision.load(os.path.join(cache, warm))
    after, _ = vision.load(os.path.join(tmp_path, "rlsd", "checkpoint-000002"))
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    towers = [n for n in b if ".visual." in n or ".audio_tower." in n]
    assert towers and all(torch.equal(b[n], a[n]) for n in towers)

    # one pass broken on purpose: the teacher's prompt of row 1 loses its audio tokens (as a
    # rollout engine that drops the audio placeholders would); the run stops at that step
    privileged = train.privileged

    def drop_audio(b, tok, *args, **kw):
        privileged(b, tok, *args, **kw)
        audio = tok.media_tokens["audio"]
        b.teacher_ids[1][b.teacher_ids[1] == audio] = tok.pad_token_id

    monkeypatch.setattr(train, "privileged", drop_audio)
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", "clips", "--algo", "opsd", "--context", "rationale", "--steps", "2",
                    "--prompts-per-step", "4", "--group-size", "2", "--eval-n", "4",
                    "--warm-start-steps", "20", "--cache-dir", cache,
                    "--out", str(tmp_path / "broken")])
    message = str(stop.value)
    assert "row 1" in message and "audio tokens" in message and "teacher 0" in message, message
    assert not os.path.exists(tmp_path / "broken" / "checkpoint-000001")
