"""vision.py: a tiny Qwen3-VL built locally loads without torchvision; prompts get one image
token per merged patch; a response's log-probs do not depend on left padding, and the chunked
LM-head path equals a full forward, with images."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine import vision
from engine.rollout import left_pad, positions
from conftest import chunk_logits
from engine.teachers import response_logits
from engine.toy import models


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    d = models.build_toy_vlm(str(tmp_path_factory.mktemp("toy-vlm")))
    model, tok = vision.load(d)
    return d, model.eval(), tok, tok.image_processor


def _image(seed, size=64):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def test_loads_without_torchvision(vlm):
    d, model, tok, proc = vlm
    assert vision.is_vision_language(d)
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    with pytest.raises(ImportError):  # this machine's CPU torch has none
        importlib.import_module("torchvision")


def test_each_image_becomes_its_merged_patches(vlm):
    _, model, tok, proc = vlm
    ids, px, grid = vision.encode(tok, proc, model.config, "1+2=", [_image(0), _image(1, 32)])
    counts = vision.image_tokens(grid, proc.merge_size)
    assert counts == [4, 1]  # 64 px: 4 x 4 patches of 16 -> 4 tokens; 32 px: 2 x 2 -> 1
    assert ids.count(model.config.image_token_id) == 5
    assert px.shape[0] == int(grid.prod(1).sum())
    with pytest.raises(ValueError, match="placeholders"):
        vision.expand_images([1, model.config.image_token_id], model.config.image_token_id, [2, 3])


def _rows(vlm):
    _, model, tok, proc = vlm
    rows = [vision.encode(tok, proc, model.config, q, [_image(s)])
            for q, s in (("12+3=", 0), ("7+8+9=", 1))]
    resp = [tok("15;", add_special_tokens=False)["input_ids"],
            tok("24;", add_special_tokens=False)["input_ids"]]
    return rows, resp


def _logits(model, rows, resp, pad_id):
    ids, mask = left_pad([r[0] for r in rows], pad_id)
    rids, rmask = left_pad(resp, pad_id)  # equal lengths here: no padding on the right
    px = torch.cat([r[1] for r in rows])
    grid = torch.cat([r[2] for r in rows])
    full_ids, full_mask = torch.cat([ids, rids], 1), torch.cat([mask, rmask], 1)
    pos = vision.rope_positions(model, full_ids, full_mask, grid)
    kinds = (full_ids == model.config.image_token_id).int()
    kw = dict(pixel_values=px, image_grid_thw=grid, mm_token_type_ids=kinds)
    return ids, mask, rids, rmask, pos, kw


@torch.no_grad()
def test_log_probs_do_not_depend_on_left_padding(vlm):
    _, model, tok, _ = vlm
    rows, resp = _rows(vlm)
    batch = _logits(model, rows, resp, tok.pad_token_id)
    ids, mask, rids, rmask, pos, kw = batch
    together = model(input_ids=torch.cat([ids, rids], 1), attention_mask=torch.cat([mask, rmask], 1),
                     position_ids=pos, **kw).logits[:, -4:-1]
    for i in range(2):
        a = _logits(model, rows[i:i + 1], resp[i:i + 1], tok.pad_token_id)
        alone = model(input_ids=torch.cat([a[0], a[2]], 1), attention_mask=torch.cat([a[1], a[3]], 1),
                      position_ids=a[4], **a[5]).logits[:, -4:-1]
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_text_rows_positions_are_the_plain_ones(vlm):
    """A row without images: the model's M-RoPE positions are the 1-D positions that skip the
    padding, in all three components."""
    _, model, tok, _ = vlm
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], tok.pad_token_id)
    pos = vision.rope_positions(model, ids, mask, None)
    want = positions(mask)
    for k in range(3):
        assert torch.equal(pos[k][mask.bool()], want[mask.bool()])


@torch.no_grad()
def test_chunked_head_equals_full_forward_with_images(vlm):
    """The trainer's logits (hidden states, then the head a chunk at a time) against
    teachers.response_logits (the model's own full logits), images and M-RoPE included."""
    _, model, tok, _ = vlm
    rows, resp = _rows(vlm)
    ids, mask, rids, rmask, pos, kw = _logits(model, rows, resp, tok.pad_token_id)
    full = response_logits(model, ids, mask, rids, rmask, position_ids=pos, **kw)
    chunks = chunk_logits(model, ids, mask, rids, rmask, position_ids=pos, **kw,
                          chunks=[(t, t + 1) for t in range(rids.shape[1])])
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-5)
    # and the images matter: the same text with another image gives other logits
    other = [vision.encode(tok, vlm[3], model.config, q, [_image(s + 7)])
             for q, s in (("12+3=", 0), ("7+8+9=", 1))]
    o = _logits(model, other, resp, tok.pad_token_id)
    assert not torch.allclose(response_logits(model, o[0], o[1], o[2], o[3], position_ids=o[4],
                                              **o[5]), full, atol=1e-4)


@torch.no_grad()
def test_cached_sampling_with_images_is_the_full_forward_argmax(vlm):
    """Greedy generation with the KV cache (images in the prefill only, then text positions
    after the largest M-RoPE position) picks, token by token, the argmax of a full forward over
    prompt + tokens so far with the images: the cache and the positions are right."""
    from engine.rollout import generate
    _, model, tok, _ = vlm
    rows, _ = _rows(vlm)
    ids, mask = left_pad([r[0] for r in rows], tok.pad_token_id)
    px, grid = torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows])
    pos = vision.rope_positions(model, ids, mask, grid)
    kinds = (ids == model.config.image_token_id).int()
    ro = generate(model, ids, mask, max_new_tokens=6, temperature=0.0, eos_id=-1,
                  pad_id=tok.pad_token_id, prefill_inputs=dict(pixel_values=px, image_grid_thw=grid,
                                                               mm_token_type_ids=kinds),
                  prefill_positions=pos)
    seq, smask = ids, mask
    for t in range(6):
        p = vision.rope_positions(model, seq, smask, grid)
        k = (seq == model.config.image_token_id).int()
        z = model(input_ids=seq, attention_mask=smask, position_ids=p, pixel_values=px,
                  image_grid_thw=grid, mm_token_type_ids=k).logits[:, -1]
        assert torch.equal(z.argmax(-1), ro.resp_ids[:, t]), t
        seq = torch.cat([seq, ro.resp_ids[:, t:t + 1]], 1)
        smask = torch.cat([smask, torch.ones_like(smask[:, :1])], 1)
    # the decode positions generate uses are the model's own M-RoPE positions of those tokens
    # (all three components), not the token count, which the image has moved them away from
    from engine.rollout import next_positions
    full = vision.rope_positions(model, seq, smask, grid)[:, :, ids.shape[1]:]
    want = next_positions(pos) + torch.arange(6)
    for k in range(3):
        assert torch.equal(full[k], want), k
    assert not torch.equal(want, positions(mask)[:, -1:] + 1 + torch.arange(6))


def _image_rows(tmp_path, n=8):
    """A JSONL file of arithmetic rows, each with an image next to it (relative path)."""
    import json

    from engine.toy import arithmetic
    lines = []
    for i, e in enumerate(arithmetic.make_toy("train", n)):
        _image(i).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps(dict(prompt=e.prompt, answer=e.answer, solution=e.solution,
                                     hint=e.hint, images=[f"img{i}.png"])))
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


@pytest.mark.parametrize("algo,extra", [("grpo", []), ("rlsd", []),
                                        ("opsd", ["--group-size", "1"]), ("ptdpo", ["--mini-batch-size", "2"]),
                                        ("sdpo", []),
                                        ("gspo", ["--mini-batch-size", "1"])])
def test_training_steps_with_images(tmp_path, vlm, algo, extra):
    """Every forward of a step (sampling, teacher, reference, old policy, loss) sees the rows'
    images; the checkpoint reloads as a vision-language model with its image processor."""
    import json
    import os

    import train
    from transformers import AutoImageProcessor, AutoModelForImageTextToText
    d = vlm[0]
    data_file = _image_rows(tmp_path)
    out = str(tmp_path / "run")
    train.main(["--algo", algo, "--model", d, "--data", data_file, "--eval-data", "",
                "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
                "--max-new-tokens", "8", "--lr", "1e-3", "--out", out, "--student-template", "",
                "--reward", "verifier", "--rollout-micro-batch", "3", *extra]
               + (["--eval-data", data_file] if algo == "grpo" else []))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == ([0, 1, 2] if algo == "grpo" else [1, 2])
    if algo == "grpo":  # evaluated with the images, before and after
        assert 0.0 <= rows[0]["eval_acc"] <= 1.0 and "eval_acc" in rows[-1]
        rows = rows[1:]
    assert all(r["loss"] == r["loss"] and r["response_len_mean"] > 0 for r in rows)
    ck = os.path.join(out, "checkpoint-000002")
    assert type(AutoModelForImageTextToText.from_pretrained(ck)).__name__ == \
        "Qwen3VLForConditionalGeneration"
    assert AutoImageProcessor.from_pretrained(ck, backend="pil").merge_size == 2


def test_resume_with_images_reproduces_the_uninterrupted_run(tmp_path, vlm):
    """Stopped after step 1 and resumed, an RLSD run on images logs the same metrics and ends
    with the same weights as the run that never stopped."""
    import json
    import os

    from safetensors.torch import load_file

    import train
    data_file = _image_rows(tmp_path)
    args = ["--algo", "rlsd", "--model", vlm[0], "--data", data_file, "--eval-data", "",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6",
            "--lr", "1e-3", "--student-template", "", "--reward", "verifier",
            "--lr-schedule", "constant", "--teacher-sync", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(args + ["--steps", "2", "--out", full])
    train.main(args + ["--steps", "1", "--out", part])
    train.main(args + ["--steps", "2", "--out", part, "--resume", "true"])

    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items()
                     if not k.startswith("time_") and k != "step_time_s"} for line in f]
    assert rows(part) == rows(full)
    a, b = (load_file(os.path.join(d, "checkpoint-000002", "model.safetensors"))
            for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_py_on_an_image_dataset(tmp_path, vlm, capsys):
    """eval.py CHECKPOINT --data FILE with images: greedy accuracy, samples, entropy."""
    import json

    import eval as evaluation
    data_file = _image_rows(tmp_path, n=4)
    evaluation.main([vlm[0], "--data", data_file, "--k", "2", "--temperature", "1",
                     "--max-new-tokens", "6"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and 0.0 <= res["pass@1_greedy"] <= 1.0 and res["entropy"] > 0


def test_an_unreadable_image_names_the_file_and_line(tmp_path, vlm, capsys):
    import train
    data_file = _image_rows(tmp_path, n=3)
    (tmp_path / "img1.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        train.main(["--algo", "grpo", "--model", vlm[0], "--data", data_file, "--eval-data", "",
                    "--steps", "1", "--out", str(tmp_path / "r"), "--student-template", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "img1.png" in err and "Traceback" not in err


@pytest.mark.parametrize("algo,extra", [("rlsd", ["--teacher-sync", "1"]), ("grpo", []),
                                        ("opsd", ["--group-size", "1"]),
                                        ("ptdpo", ["--mini-batch-size", "2"]), ("sdpo", [])])
def test_torchrun_two_processes_with_images(tmp_path, vlm, algo, extra):
    """FSDP2 over 2 processes shards the vision tower's blocks too; each algorithm trains on
    images (every rank samples, scores and reduces its own rows with their pictures)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_file = _image_rows(tmp_path)
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(root, "train.py"), "--algo", algo, "--model", vlm[0], "--data",
           data_file, "--eval-data", "", "--steps", "2", "--prompts-per-step", "2",
           "--group-size", "2", "--max-new-tokens", "8", "--out", out, "--student-template", "",
           "--reward", "verifier", *extra]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert os.path.exists(os.path.join(out, "checkpoint-000002", "preprocessor_config.json"))


def test_lora_on_a_vision_language_model(tmp_path, vlm):
    """--lora-rank on a Qwen3-VL: adapters on the language model's linear layers only (the
    vision tower stays frozen, as do the base weights), two OPSD steps on images (a distillation
    loss, nonzero whatever the untrained model's rewards), and the adapter checkpoint loads back
    merged into a vision-language model."""
    import os

    from safetensors.torch import load_file

    from engine import lora
    import train
    from engine.rollout import load_model
    data_file = _image_rows(tmp_path)
    out = str(tmp_path / "lora")
    train.main(["--algo", "opsd", "--model", vlm[0], "--data", data_file, "--eval-data", "",
                "--steps", "2", "--prompts-per-step", "2", "--group-size", "1",
                "--max-new-tokens", "6", "--lr", "1e-2", "--out", out, "--student-template", "",
                "--reward", "verifier", "--lora-rank", "4"])
    ck = os.path.join(out, "checkpoint-000002")
    saved = load_file(os.path.join(ck, lora.ADAPTER_WEIGHTS))
    assert saved and all("language_model" in k for k in saved)  # nothing in the vision tower
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # trained
    merged, tok = load_model(ck)
    assert type(merged).__name__ == "Qwen3VLForConditionalGeneration" and not lora.is_lora(merged)
    assert tok.image_processor.merge_size == 2  # eval.py can build image prompts with it


def test_eval_py_reproduces_the_trainers_accuracy_with_images(tmp_path, vlm, capsys):
    """The image counterpart of test_eval.py's: the run's template and reward, the images."""
    import json
    import os

    import eval as evaluation
    import train
    data_file, out = _image_rows(tmp_path, n=6), str(tmp_path / "run")
    train.main(["--algo", "grpo", "--model", vlm[0], "--data", data_file,
                "--eval-data", data_file, "--steps", "1", "--prompts-per-step", "2",
                "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--out", out,
                "--student-template", "Q{prompt}:", "--reward", "signal_reward:parity"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        want = [json.loads(line) for line in f][-1]["eval_acc"]
    capsys.readouterr()
    evaluation.main([os.path.join(out, "checkpoint-000001"), "--reward", "signal_reward:parity",
                     "--data", data_file])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["pass@1_greedy"] == want
