"""shapes.py: the embedded image task's pictures show what its solutions say; the careless
demonstrator overlooks only the right-hand column; `python train.py --data shapes` runs RLSD on
the tiny Qwen3-VL with no downloads."""
import io
import json
import os
import random

import numpy as np
import torch
from PIL import Image

import data
import train
from engine import vision
from engine.toy import models, shapes


def _seen_colours(png: bytes) -> list:
    """Per cell, the colour letter whose RGB value covers some of its pixels (None: blank)."""
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    out = []
    for k in range(shapes.GRID ** 2):
        r, c = divmod(k, shapes.GRID)
        cell = px[r * shapes.CELL:(r + 1) * shapes.CELL, c * shapes.CELL:(c + 1) * shapes.CELL]
        hits = [name for name, rgb in shapes.COLOURS.items()
                if (np.abs(cell - np.array(rgb)).sum(-1) < 30).sum() > 20]
        assert len(hits) <= 1, (k, hits)
        out.append(hits[0] if hits else None)
    return out


def test_pictures_show_what_the_solutions_say():
    rng = random.Random(0)
    for _ in range(60):
        ex, cells = shapes.shapes_example(rng, rng.randint(2, 9))
        seen = _seen_colours(ex.images[0])
        assert seen == [c and c[0] for c in cells]  # each shape inside its own cell
        listed = "".join(str(k + 1) for k, c in enumerate(seen) if c == ex.prompt)
        assert ex.solution == f"{listed}={len(listed)}" and ex.answer == str(len(listed))
        assert data.is_correct(ex.solution, ex.answer)
        assert ex.hint == "".join(sorted({str((int(d) - 1) // 3 + 1) for d in listed}))
        assert ex.rationale == str(sum(c is not None for c in seen))


def test_splits_are_fixed_and_disjoint():
    key = lambda e: (e.images[0], e.prompt)  # noqa: E731
    train_set = {key(e) for e in shapes.make_shapes("train", 2000)}
    test = shapes.make_shapes("test", 200)
    assert len({key(e) for e in test}) == 200 and not train_set & {key(e) for e in test}
    assert [key(e) for e in test] == [key(e) for e in shapes.make_shapes("test", 200, seed=0)]
    assert all(7 <= int(e.rationale) <= 9 for e in shapes.make_shapes("ood", 50))
    assert all(2 <= int(e.rationale) <= 6 for e in test)


def test_the_careless_demonstrator_overlooks_only_the_right_column():
    rng = random.Random(1)
    for e in shapes.make_shapes("train", 300):
        assert shapes.careless_solution(e, rng, 0.0) == e.solution
        listed = "".join(d for d in e.solution.split("=")[0] if int(d) not in (3, 6, 9))
        assert shapes.careless_solution(e, rng, 1.0) == f"{listed}={len(listed)}"


def test_train_py_runs_rlsd_on_the_shapes_task(tmp_path, monkeypatch):
    """The tiny Qwen3-VL warm-started on the task (30 steps here, its tower taught to see for
    60), RLSD on it, evaluated on the task's test and ood splits, a Qwen3-VL checkpoint with
    its image processor."""
    from functools import partial
    from transformers import AutoModelForImageTextToText
    monkeypatch.setattr(shapes, "teach_to_see", partial(shapes.teach_to_see, steps=60))
    out = str(tmp_path / "run")
    train.main(["--data", "shapes", "--steps", "2", "--prompts-per-step", "4",
                "--group-size", "2", "--eval-n", "4", "--warm-start-steps", "30",
                "--cache-dir", str(tmp_path / "cache"), "--out", out])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"test_acc", "ood_acc", "test_teacher_acc"} <= set(rows[0]) <= set(rows[-1])
    assert all(r["response_len_mean"] > 0 and r["loss"] == r["loss"] for r in rows[1:])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["data"] == cfg["eval_data"] == "shapes" and cfg["max_new_tokens"] == 16
    assert any(d.startswith("shapes-student-") for d in os.listdir(tmp_path / "cache"))
    ck = os.path.join(out, "checkpoint-000002")
    trained = AutoModelForImageTextToText.from_pretrained(ck)
    assert type(trained).__name__ == "Qwen3VLForConditionalGeneration"
    # --freeze-vision (the toy's default): RL left the warm start's tower as it was
    cached = [d for d in os.listdir(tmp_path / "cache") if not d.endswith(".lock")]
    warm = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "cache" / cached[0]))
    for (n, p), q in zip(trained.model.visual.named_parameters(), warm.model.visual.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, q) for p, q in zip(trained.model.language_model.parameters(),
                                                      warm.model.language_model.parameters()))


def test_parquet_image_bytes_with_other_column_names(tmp_path):
    """Images as bytes or {bytes, path} structs (a datasets Image column) load and are checked;
    a damaged one names its row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    exs = shapes.make_shapes("test", 3)
    pics = [[{"bytes": exs[0].images[0], "path": "a.png"}], [exs[1].images[0]], [b"not a png"]]
    f = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"q": [e.prompt for e in exs], "a": [e.answer for e in exs],
                             "pics": [[p if isinstance(p, dict) else {"bytes": p, "path": None}
                                       for p in row] for row in pics]}), f)
    rows = data.load_examples(f, columns={"prompt": "q", "answer": "a", "images": "pics"})
    assert [r.images for r in rows[:2]] == [exs[0].images, exs[1].images]
    try:
        vision.check_media(rows)
    except data.DataError as e:
        assert "row 3" in str(e) and "image 1 (bytes)" in str(e)
    else:
        raise AssertionError("a damaged image was accepted")


def test_freeze_vision_freezes_the_tower_only_and_refuses_a_text_model():
    import pytest
    from engine import config
    from engine.toy.models import build_toy_model, build_toy_tokenizer
    assert all(config.resolve_config(dict(algo=a, data="shapes")).freeze_vision
               for a in ("sft", "rlsd"))  # the toy's default, warm start and RL
    model, _ = models.toy_vlm(seed=0, hidden=32, layers=1, head_dim=16)
    n = vision.freeze_vision_tower(model)
    assert n == sum(p.numel() for p in model.model.visual.parameters()) > 0
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    with pytest.raises(ValueError, match="no vision tower"):
        vision.freeze_vision_tower(build_toy_model(build_toy_tokenizer()))
    with pytest.raises(SystemExit, match="text model"):  # caught before any loading
        config.resolve_config(dict(algo="rlsd", freeze_vision=True))


def test_teach_to_see_trains_the_tower_to_tell_cells_and_centres_its_projector():
    model, tok = models.toy_vlm(seed=0, hidden=32, layers=1, head_dim=16)
    language = {n: p.clone() for n, p in model.model.language_model.named_parameters()}
    content, cell = shapes.teach_to_see(model, tok, steps=400, seed=0, batch=8)
    assert content > 0.9  # 9 cells x 5 classes; always "empty" would be about 0.55
    assert cell > 0.5  # 9 cells: guessing gives 0.11 (measured: 0.99 and 0.68)
    for n, p in model.model.language_model.named_parameters():  # the tower alone trained
        assert torch.equal(p, language[n]), n
    rng = random.Random(1)
    ims = [Image.open(io.BytesIO(shapes.shapes_example(rng, 4)[0].images[0])).convert("RGB")
           for _ in range(16)]
    px = tok.image_processor(images=ims, return_tensors="pt")
    with torch.no_grad():
        f = model.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"],
                               return_dict=True).pooler_output
    # centred: the vector common to every token is small next to what varies between them
    assert f.mean(0).norm() < 0.5 * (f - f.mean(0)).norm(dim=1).mean()
