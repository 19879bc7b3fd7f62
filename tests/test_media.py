"""Video and audio (engine/media.py, engine/vision.py): files read as stated; two identical
frames patch to exactly the PIL image processor's patches; a tiny Qwen2.5-Omni thinker and tiny
Qwen2-VL / Qwen2.5-VL / Qwen3-VL models give each row the same log-probs alone as in a
left-padded batch, the chunked head equals the full forward, cached greedy sampling is the full
forward's argmax; OPSD, RLSD, GRPO and PTD-PO train on rows with a video and an audio clip, in
one process and under torchrun, resume bit-exactly and reload; a bad file is named by its row.

Tolerances: 1e-5 where two float32 forwards differ only in padding (the same dot products in
another order: a few float32 ulps of activations of order 1), as in tests/test_vision.py."""
import io
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import chunk_logits
from data import Example
from engine import media, vision
from engine.prompts import TOY_TEMPLATES, Prompts
from engine.rollout import generate, left_pad
from engine.teachers import response_logits
from engine.toy import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

def frame(colour, size=64, seed=0) -> np.ndarray:
    """A frame of one colour with a square of noise in its top-left quarter."""
    a = np.zeros((size, size, 3), np.uint8)
    a[:] = colour
    a[:size // 4, :size // 4] = np.random.RandomState(seed).randint(0, 255, (size // 4, size // 4, 3))
    return a


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def tone(freq, seconds, rate=16000, amp=0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path, x, rate=16000, width=2, channels=1):
    x = np.repeat(x[:, None], channels, 1) if channels > 1 else x
    if width == 1:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.round(x * (2**23 - 1)).astype(np.int32).reshape(-1)
        raw = np.stack([v & 255, v >> 8 & 255, v >> 16 & 255], 1).astype(np.uint8).tobytes()
    else:
        raw = np.round(x * (2 ** (8 * width - 1) - 1)).astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return str(path)


def write_mp4(path, colours, fps=4, audio_seconds=None):
    """An MPEG-4 file (PyAV) of 64 x 64 frames of `colours`, with a 440 Hz AAC track."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as c:
        v = c.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = c.add_stream("aac", rate=16000) if audio_seconds else None
        for k, col in enumerate(colours):
            for pkt in v.encode(av.VideoFrame.from_ndarray(frame(col, seed=k), format="rgb24")):
                c.mux(pkt)
        if a:
            x = tone(440, audio_seconds)
            for i in range(0, len(x), 1024):
                f = av.AudioFrame.from_ndarray(x[None, i:i + 1024], format="fltp", layout="mono")
                f.sample_rate = 16000
                for pkt in a.encode(f):
                    c.mux(pkt)
        for stream in (v, a) if a else (v,):
            for pkt in stream.encode():
                c.mux(pkt)
    return str(path)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_of_every_sample_width_reads_as_mono_floats(tmp_path, width, channels):
    """WAV through the standard library: 8-bit unsigned, 16/24/32-bit signed, stereo
    averaged to mono; within one quantisation step of the samples written."""
    x = tone(440, 0.1, rate=8000)
    got, rate = media.read_audio(write_wav(tmp_path / "a.wav", x, 8000, width, channels))
    assert rate == 8000 and got.dtype == np.float32 and got.shape == x.shape
    assert np.abs(got - x).max() <= 1.0 / 2 ** (8 * width - 1) + 1e-7


def test_npy_and_array_items(tmp_path):
    x = tone(300, 0.2)
    np.save(tmp_path / "a.npy", x)
    got, rate = media.read_audio(str(tmp_path / "a.npy"))
    assert rate == media.AUDIO_RATE and np.array_equal(got, x)
    got, rate = media.read_audio({"array": x.tolist(), "sampling_rate": 8000})
    assert rate == 8000 and np.allclose(got, x)
    got, rate = media.read_audio({"path": str(tmp_path / "a.npy"), "sampling_rate": 22050})
    assert rate == 22050


def test_resampling_a_band_limited_tone_is_exact():
    """FFT resampling of a tone with a whole number of cycles in the clip (band-limited and
    periodic) gives that tone sampled at the new rate, to float32 rounding."""
    x = tone(441, 1.0, rate=44100)  # 441 whole cycles
    y = media.resample(x, 44100, 16000)
    assert len(y) == 16000
    np.testing.assert_allclose(y, tone(441, 1.0, rate=16000), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be converted"):
        media.resample(x, 0, 16000)


def test_sampled_frames_follow_the_processor_rule():
    """fps frames a second, a whole number of temporal patches, evenly spread, within bounds."""
    idx = media.sample_frames(300, 30.0, target_fps=2.0, temporal=2, min_frames=4, max_frames=768)
    assert len(idx) == 20 and idx == sorted(idx) and idx[0] == 0 and idx[-1] < 300
    assert len(media.sample_frames(300, 30.0, target_fps=2.0, temporal=2, min_frames=4,
                                   max_frames=8)) == 8
    assert len(media.sample_frames(5, 2.0, target_fps=2.0, temporal=2, min_frames=2,
                                   max_frames=768)) == 4  # odd count: down to whole patches
    assert media.sample_frames(1, 2.0, target_fps=2.0, temporal=2, min_frames=2,
                               max_frames=768) == [0]  # shorter than a patch: padded later


@pytest.mark.parametrize("build", [models.toy_vlm_tokenizer, lambda: models.toy_omni()[1]])
def test_two_identical_frames_are_the_image_processors_patches(build):
    """The video patching (no torchvision) against transformers' PIL image processor, which
    itself repeats an image over the temporal patch: exactly equal. An odd frame count repeats
    the last frame: its temporal patch is that frame's image patches."""
    proc = build().image_processor
    a, b = frame((200, 30, 30), seed=1), frame((30, 30, 200), seed=2)
    want_a = proc(images=[Image.fromarray(a)], return_tensors="pt")
    want_b = proc(images=[Image.fromarray(b)], return_tensors="pt")
    px, grid = media.video_pixels(np.stack([a, a]), proc, temporal=2)
    assert torch.equal(px, want_a["pixel_values"]) and torch.equal(grid, want_a["image_grid_thw"])
    px, grid = media.video_pixels(np.stack([a, a, b]), proc, temporal=2)
    n = want_a["pixel_values"].shape[0]
    assert grid.tolist() == [[2, 4, 4]] and torch.equal(px[:n], want_a["pixel_values"])
    assert torch.equal(px[n:], want_b["pixel_values"])


def test_videos_read_from_frames_a_directory_or_a_file(tmp_path):
    colours = [(200, 30, 30)] * 4 + [(30, 200, 30)] * 4
    paths = []
    for k, c in enumerate(colours):
        paths.append(str(tmp_path / f"f{k:02d}.png"))
        Image.fromarray(frame(c, seed=k)).save(paths[-1])
    frames, fps = media.read_video(paths, fps=4.0)
    assert frames.shape == (8, 64, 64, 3) and fps == 4.0
    frames2, _ = media.read_video(str(tmp_path))
    assert np.array_equal(frames, frames2)
    frames3, fps = media.read_video({"frames": [png(frame(c, seed=k)) for k, c in enumerate(colours)],
                                     "fps": 8})
    assert np.array_equal(frames, frames3) and fps == 8.0
    mp4 = write_mp4(tmp_path / "c.mp4", colours, fps=4, audio_seconds=2.0)
    frames4, fps = media.read_video(mp4)
    assert frames4.shape == (8, 64, 64, 3) and fps == 4.0
    # lossy coding: the colours survive, not the pixels
    assert abs(int(frames4[0, 40, 40, 0]) - 200) < 20 and abs(int(frames4[7, 40, 40, 1]) - 200) < 20
    x, rate = media.video_audio(mp4)  # the file's own track
    # AAC codes 1024-sample frames and may keep its 1024 priming samples: up to 2047 more
    assert rate == 16000 and 32000 <= len(x) < 32000 + 2048
    with pytest.raises(ValueError, match="no audio track"):
        media.video_audio(paths)


def test_audio_features_are_unpadded_and_tokens_are_the_towers():
    """100 feature frames a second; the token count is the audio tower's own output length."""
    model, tok = models.toy_omni()
    f = media.audio_features(tone(440, 1.5), tok.feature_extractor)
    assert f.shape == (128, 150)
    tower = model.model.audio_tower
    for frames in (1, 2, 3, 99, 100, 101, 150, 3000):
        _, want = tower._get_feat_extract_output_lengths(torch.tensor(frames))
        assert media.audio_tokens(frames) == int(want), frames
    assert media.audio_tokens(100) == 25


# ----------------------------------------------------------------------------------------
# The Qwen2.5-Omni thinker
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    d = models.save_toy(*models.toy_omni(), str(tmp_path_factory.mktemp("omni")))
    model, tok = vision.load(d)
    return d, model.eval(), tok


def _rows(tmp_path):
    """Rows with a video and an audio clip, a video alone, audio alone, and text."""
    frames = [png(frame(c, seed=k)) for k, c in enumerate([(200, 30, 30)] * 3 + [(30, 200, 30)] * 3)]
    wav = write_wav(tmp_path / "a.wav", tone(300, 1.0) + tone(700, 1.0, amp=0.2))
    return [Example(prompt="r", answer="2", videos=[{"frames": frames[:4], "fps": 2}],
                    audios=[wav]),
            Example(prompt="g1", answer="1", videos=[{"frames": frames, "fps": 2}]),
            Example(prompt="3+4", answer="7", audios=[{"array": tone(500, 0.6), "sampling_rate": 16000}]),
            Example(prompt="b", answer="0")]


def _batch(model, tok, rows, resp, P=None):
    P = P or Prompts(TOY_TEMPLATES)
    ids = [P.student(tok, e) for e in rows]
    med = [P.media(tok, e) for e in rows]
    ii, mm = left_pad(ids, tok.pad_token_id)
    rm = torch.ones_like(resp)
    return ids, med, ii, mm, rm, vision.forward_inputs(model, med, ii, mm, resp, rm)


def test_loads_the_thinker_without_torchvision(omni):
    d, model, tok = omni
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert type(tok.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert tok.media_tokens["family"] == "omni" and tok.video_settings["fps"] == 2.0
    with pytest.raises(ImportError):
        __import__("torchvision")


def test_each_medium_becomes_its_tokens(omni, tmp_path):
    """A 4-frame 64 x 64 video: 2 temporal patches of 4 x 4 patches merged 2 x 2 -> 8 tokens;
    one second of audio -> 25 tokens."""
    _, model, tok = omni
    ids = Prompts(TOY_TEMPLATES).student(tok, _rows(tmp_path)[0])
    T = tok.media_tokens
    assert ids.count(T["video"]) == 8 and ids.count(T["audio"]) == 25


@torch.no_grad()
def test_log_probs_do_not_depend_on_left_padding_with_video_and_audio(omni, tmp_path):
    _, model, tok = omni
    rows = _rows(tmp_path)
    resp = torch.randint(3, 20, (len(rows), 5), generator=torch.Generator().manual_seed(0))
    ids, med, ii, mm, rm, kw = _batch(model, tok, rows, resp)
    together = response_logits(model, ii, mm, resp, rm, **kw)
    for r in range(len(rows)):
        i1, m1 = torch.tensor([ids[r]]), torch.ones(1, len(ids[r]), dtype=torch.long)
        k1 = vision.forward_inputs(model, [med[r]], i1, m1, resp[r:r + 1], rm[r:r + 1])
        alone = response_logits(model, i1, m1, resp[r:r + 1], rm[r:r + 1], **k1)
        torch.testing.assert_close(together[r:r + 1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_audio_in_video_interleaves_and_does_not_depend_on_padding(omni, tmp_path):
    """--use-audio-in-video: a video file's own track, interleaved with its tokens in 2-second
    chunks between audio-start and audio-end (the official processor's layout)."""
    _, model, tok = omni
    long = write_mp4(tmp_path / "long.mp4", [(200, 30, 30)] * 12 + [(30, 200, 30)] * 8, fps=4,
                     audio_seconds=5.0)
    short = write_mp4(tmp_path / "short.mp4", [(30, 30, 200)] * 6, fps=4, audio_seconds=1.5)
    rows = [Example(prompt="r", answer="1", videos=[long]), Example(prompt="b", answer="1", videos=[short])]
    P = Prompts(TOY_TEMPLATES, audio_in_video=True)
    ids = P.student(tok, rows[0])
    T = tok.media_tokens
    body = ids[ids.index(T["audio_bos"]) + 1:ids.index(T["audio_eos"])]
    kinds = "".join("v" if i == T["video"] else "a" for i in body)
    # 5 s at 2 frames a second: 10 frames, 5 temporal patches of 4 tokens, 25 positions a
    # second -> chunk 1 (0-2 s): patches 0, 1 (8 tokens) then 50 audio tokens; chunk 2: patches
    # 2, 3, then 50; chunk 3: patch 4, then the rest of the track
    n_audio = kinds.count("a")
    assert kinds == "v" * 8 + "a" * 50 + "v" * 8 + "a" * 50 + "v" * 4 + "a" * (n_audio - 100)
    assert 125 <= n_audio <= 125 + 2048 // 640 + 1  # 25 a second, AAC's extra samples aside
    resp = torch.randint(3, 20, (2, 4), generator=torch.Generator().manual_seed(1))
    ids, med, ii, mm, rm, kw = _batch(model, tok, rows, resp, P)
    assert kw["use_audio_in_video"] is True
    together = response_logits(model, ii, mm, resp, rm, **kw)
    for r in range(2):
        i1, m1 = torch.tensor([ids[r]]), torch.ones(1, len(ids[r]), dtype=torch.long)
        k1 = vision.forward_inputs(model, [med[r]], i1, m1, resp[r:r + 1], rm[r:r + 1])
        torch.testing.assert_close(together[r:r + 1],
                                   response_logits(model, i1, m1, resp[r:r + 1], rm[r:r + 1], **k1),
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_head_equals_full_forward_and_the_media_matter(omni, tmp_path):
    _, model, tok = omni
    rows = _rows(tmp_path)
    resp = torch.randint(3, 20, (len(rows), 5), generator=torch.Generator().manual_seed(2))
    _, _, ii, mm, rm, kw = _batch(model, tok, rows, resp)
    full = response_logits(model, ii, mm, resp, rm, **kw)
    chunks = chunk_logits(model, ii, mm, resp, rm, **kw, chunks=[(t, t + 1) for t in range(5)])
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-5)
    quiet = [Example(prompt=rows[0].prompt, answer="2", videos=rows[0].videos,
                     audios=[{"array": np.zeros(16000, np.float32), "sampling_rate": 16000}])]
    other = [Example(prompt=rows[0].prompt, answer="2", videos=rows[1].videos[:1] and
                     [{"frames": rows[1].videos[0]["frames"][2:], "fps": 2}], audios=rows[0].audios)]
    for changed in (quiet, other):  # another audio track; other frames
        _, _, i2, m2, r2, k2 = _batch(model, tok, changed, resp[:1])
        assert not torch.allclose(response_logits(model, i2, m2, resp[:1], r2, **k2), full[:1],
                                  atol=1e-4)


@torch.no_grad()
def test_cached_sampling_with_video_and_audio_is_the_full_forward_argmax(omni, tmp_path):
    """Greedy generation with the KV cache (the towers run once, in the prefill; decode
    positions continue from the largest TMRoPE position) picks the argmax of a full forward
    over the prompt and the tokens so far, with the media."""
    _, model, tok = omni
    rows = _rows(tmp_path)
    P = Prompts(TOY_TEMPLATES)
    ids = [P.student(tok, e) for e in rows]
    med = [P.media(tok, e) for e in rows]
    ii, mm = left_pad(ids, tok.pad_token_id)
    kw = vision.forward_inputs(model, med, ii, mm)
    pos = kw.pop("position_ids")
    banned = vision.placeholder_ids(tok)
    ro = generate(model, ii, mm, max_new_tokens=6, temperature=0.0, eos_id=-1,
                  pad_id=tok.pad_token_id, prefill_inputs=kw, prefill_positions=pos,
                  banned_ids=banned)
    full = response_logits(model, ii, mm, ro.resp_ids, ro.resp_mask,
                           **vision.forward_inputs(model, med, ii, mm, ro.resp_ids, ro.resp_mask))
    full[..., banned] = float("-inf")
    assert torch.equal(full.argmax(-1), ro.resp_ids)


# ----------------------------------------------------------------------------------------
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL with videos
# ----------------------------------------------------------------------------------------

def _tiny_vl(kind):
    """A tiny model of a Qwen-VL family with the toy VLM tokenizer (video placeholders)."""
    if kind == "qwen3_vl":
        model, tok = models.toy_vlm(head_dim=32)
        tok.video_settings = {}
        return model.eval(), tok
    tok = models.toy_vlm_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in models.VISION_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [8, 4, 4]})
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model
        tower = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
        tower = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     fullatt_block_indexes=[1], window_size=64)
    config = Config(text_config=text, vision_config=dict(patch_size=16, spatial_merge_size=2,
                                                         temporal_patch_size=2, **tower),
                    image_token_id=ids[vision.IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
                    vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    tok.media_tokens, tok.video_settings = vision.media_tokens(config), {}
    return Model(config).eval(), tok


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_qwen_vl_families_with_videos(kind):
    """Each family's own placeholders and positions (Qwen3-VL: a timestamp and its own
    vision start / end per temporal patch); left padding changes nothing; cached greedy
    sampling is the full forward's argmax."""
    model, tok = _tiny_vl(kind)
    frames = [png(frame(c, size=32, seed=k)) for k, c in enumerate([(200, 30, 30)] * 4 + [(30, 200, 30)] * 2)]
    rows = [Example(prompt="r", answer="1", videos=[{"frames": frames, "fps": 2}]),
            Example(prompt="g1", answer="1", videos=[{"frames": frames[:2], "fps": 2}],
                    images=[frames[0]]),
            Example(prompt="b", answer="0")]
    P = Prompts(TOY_TEMPLATES)
    ids = P.student(tok, rows[0])
    text = tok.decode(ids)
    if kind == "qwen3_vl":
        # each temporal patch's mean frame time (frames k / fps), written "<0.2 seconds>" (the
        # toy tokenizer has no '<' or letters of "seconds": they encode as <unk> here)
        assert P.media(tok, rows[0]).videos[0].timestamps == (0.25, 1.25, 2.25)
        assert text.count("<|vision_start|>") == 3 and text.count("<|video_pad|>") == 3
    else:
        assert text.count("<|video_pad|>") == 3 and text.count("<|vision_start|>") == 1
    resp = torch.randint(3, 20, (3, 4), generator=torch.Generator().manual_seed(3))
    ids, med, ii, mm, rm, kw = _batch(model, tok, rows, resp)
    together = response_logits(model, ii, mm, resp, rm, **kw)
    for r in range(3):
        i1, m1 = torch.tensor([ids[r]]), torch.ones(1, len(ids[r]), dtype=torch.long)
        k1 = vision.forward_inputs(model, [med[r]], i1, m1, resp[r:r + 1], rm[r:r + 1])
        torch.testing.assert_close(together[r:r + 1],
                                   response_logits(model, i1, m1, resp[r:r + 1], rm[r:r + 1], **k1),
                                   atol=1e-5, rtol=1e-5)
    kw = vision.forward_inputs(model, med, ii, mm)
    pos = kw.pop("position_ids")
    ro = generate(model, ii, mm, max_new_tokens=5, temperature=0.0, eos_id=-1,
                  pad_id=tok.pad_token_id, prefill_inputs=kw, prefill_positions=pos,
                  banned_ids=vision.placeholder_ids(tok))
    full = response_logits(model, ii, mm, ro.resp_ids, ro.resp_mask,
                           **vision.forward_inputs(model, med, ii, mm, ro.resp_ids, ro.resp_mask))
    full[..., vision.placeholder_ids(tok)] = float("-inf")
    assert torch.equal(full.argmax(-1), ro.resp_ids)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------

def clip_rows(tmp_path, n=6) -> str:
    """A JSONL file of rows with a video (frame files) and an audio clip (WAV) next to it, a
    rationale (OmniOPSD's context) and a hint (PTD-PO's)."""
    lines = []
    for i in range(n):
        names = []
        for k in range(4):
            names.append(f"c{i}_{k}.png")
            Image.fromarray(frame((40 * i % 255, 200, 30 * k), seed=i * 10 + k)).save(tmp_path / names[-1])
        write_wav(tmp_path / f"a{i}.wav", tone(200 + 100 * i, 1.0), rate=22050)  # resampled
        lines.append(json.dumps(dict(prompt=f"{i}+1", answer=str(i + 1), solution=f"{i}+1={i + 1}",
                                     rationale="one more", hint="add", videos=[names],
                                     audios=[f"a{i}.wav"])))
    f = tmp_path / "clips.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


ALGOS = [("grpo", []), ("rlsd", []), ("opsd", ["--context", "rationale", "--group-size", "1"]),
         ("ptdpo", ["--mini-batch-size", "2"])]


def _args(model_dir, data_file, out, algo, extra, steps=2):
    return ["--algo", algo, "--model", model_dir, "--data", data_file, "--eval-data", "",
            "--steps", str(steps), "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--lr", "1e-3", "--out", out, "--student-template", "",
            "--reward", "verifier", *extra]


def _steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("algo,extra", ALGOS)
def test_training_steps_with_video_and_audio(tmp_path, omni, algo, extra):
    """Every forward of a step sees the rows' video and audio; --freeze-towers keeps both
    towers as loaded; the checkpoint reloads as an Omni thinker with its processors."""
    import train
    out = str(tmp_path / "run")
    data_file = clip_rows(tmp_path)
    train.main(_args(omni[0], data_file, out, algo, extra + ["--freeze-towers", "true"])
               + (["--eval-data", data_file] if algo == "grpo" else []))
    rows = _steps(out)
    assert [r["step"] for r in rows] == ([0, 1, 2] if algo == "grpo" else [1, 2])
    assert all(r["loss"] == r["loss"] for r in rows if r["step"])
    ck = os.path.join(out, "checkpoint-000002")
    model, tok = vision.load(ck)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert tok.feature_extractor.feature_size == 128 and tok.video_settings["fps"] == 2.0
    before, after = dict(omni[1].named_parameters()), dict(model.named_parameters())
    tower = [k for k in before if ".audio_tower." in k or ".visual." in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not all(torch.equal(before[k], after[k]) for k in before)  # the rest learnt


def test_resume_with_video_and_audio_reproduces_the_uninterrupted_run(tmp_path, omni):
    from safetensors.torch import load_file

    import train
    data_file = clip_rows(tmp_path)
    extra = ["--lr-schedule", "constant", "--teacher-sync", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(_args(omni[0], data_file, full, "rlsd", extra))
    train.main(_args(omni[0], data_file, part, "rlsd", extra, steps=1))
    train.main(_args(omni[0], data_file, part, "rlsd", extra + ["--resume", "true"]))

    def logged(d):
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "step_time_s"}
                for r in _steps(d)]
    assert logged(part) == logged(full)
    a, b = (load_file(os.path.join(d, "checkpoint-000002", "model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo,extra", ALGOS)
def test_torchrun_two_processes_with_video_and_audio(tmp_path, omni, algo, extra):
    """FSDP2 over 2 processes (the vision blocks and audio layers sharded too)."""
    data_file = clip_rows(tmp_path)
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *_args(omni[0], data_file, out, algo, extra)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _steps(out)] == [1, 2]
    assert os.path.exists(os.path.join(out, "checkpoint-000002", "video_preprocessor_config.json"))


def test_the_omniopsd_recipe_runs_on_the_tiny_thinker(tmp_path, omni):
    """Every option of recipes/omniopsd-qwen2.5-omni-7b.toml together (LoRA, audio in video,
    frozen towers, bf16, checkpointing, micro-batches) with the model swapped for the tiny
    thinker and the batch shrunk, on video files with their own sound."""
    import train
    rows = []
    for i in range(4):
        write_mp4(tmp_path / f"v{i}.mp4", [(200, 30 * i, 30)] * 4 + [(30, 200, 30 * i)] * 4,
                  fps=4, audio_seconds=2.0)
        rows.append(json.dumps(dict(prompt=f"{i}+1", answer=str(i + 1), rationale="one more",
                                    videos=f"v{i}.mp4")))
    (tmp_path / "v.jsonl").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "run")
    train.main(["--preset", "omniopsd-qwen2.5-omni-7b", "--model", omni[0], "--data",
                str(tmp_path / "v.jsonl"), "--steps", "2", "--prompts-per-step", "2",
                "--max-new-tokens", "4", "--micro-batch-size", "1", "--student-template", "",
                "--out", out])
    assert [r["step"] for r in _steps(out)] == [1, 2]


def test_lora_adapts_the_language_model_only(tmp_path, omni):
    """The audio tower has q_proj / k_proj / v_proj too; adapters go on the language model."""
    from safetensors.torch import load_file

    from engine import lora
    import train
    out = str(tmp_path / "lora")
    train.main(_args(omni[0], clip_rows(tmp_path), out, "opsd",
                     ["--context", "rationale", "--group-size", "1", "--lora-rank", "4",
                      "--lr", "1e-2"]))
    saved = load_file(os.path.join(out, "checkpoint-000002", lora.ADAPTER_WEIGHTS))
    assert saved and all("language_model" in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)


def test_eval_py_reproduces_the_trainers_accuracy_with_video_and_audio(tmp_path, omni, capsys):
    """The video and audio counterpart of tests/test_eval.py's: a run with renamed media
    columns and its own template; eval.py CHECKPOINT reads them from the run's config.json."""
    import train

    import eval as evaluation
    data_file = clip_rows(tmp_path)
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(open(data_file).read().replace('"videos"', '"clip"').replace('"audios"', '"sound"'))
    out = str(tmp_path / "run")
    train.main(_args(omni[0], str(renamed), out, "grpo", ["--eval-data", str(renamed),
                                                          "--videos-key", "clip", "--audios-key", "sound",
                                                          "--student-template", "Q{prompt}:",
                                                          "--reward", "signal_reward:parity",
                                                          "--steps", "1"]))
    want = _steps(out)[-1]["eval_acc"]
    capsys.readouterr()
    evaluation.main([os.path.join(out, "checkpoint-000001"), "--reward", "signal_reward:parity",
                     "--data", str(renamed)])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["pass@1_greedy"] == want


def test_eval_py_on_clips(tmp_path, omni, capsys):
    import eval as evaluation
    evaluation.main([omni[0], "--data", clip_rows(tmp_path, n=3), "--max-new-tokens", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 3 and 0.0 <= res["pass@1_greedy"] <= 1.0


# ----------------------------------------------------------------------------------------
# Bad input: one message naming the row, or a config error
# ----------------------------------------------------------------------------------------

def _fails(args, capsys, code=2):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err + str(e.value.code)
    assert "Traceback" not in err
    return err


def test_bad_media_files_are_named_by_their_row(tmp_path, omni, capsys):
    data_file = clip_rows(tmp_path, n=3)
    args = _args(omni[0], data_file, str(tmp_path / "r"), "grpo", [])
    (tmp_path / "a1.wav").write_bytes(b"RIFF not really")
    err = _fails(args, capsys)
    assert "clips.jsonl:2" in err and "a1.wav" in err
    write_wav(tmp_path / "a1.wav", tone(200, 0.5))
    (tmp_path / "c2_1.png").unlink()
    err = _fails(args, capsys)
    assert "clips.jsonl:3" in err and "video" in err
    Image.fromarray(frame((0, 0, 0))).save(tmp_path / "c2_1.png")
    err = _fails(args + ["--use-audio-in-video", "true"], capsys)  # frames have no track
    assert "clips.jsonl:1" in err and "no audio track" in err


def test_audio_for_a_model_without_an_audio_tower_is_a_config_error(tmp_path, capsys):
    d = models.build_toy_vlm(str(tmp_path / "vlm"))
    err = _fails(_args(d, clip_rows(tmp_path, n=2), str(tmp_path / "r"), "grpo", []), capsys)
    assert "config error" in err and "clips.jsonl:1" in err and "audio tower" in err


def test_a_qwen3_omni_checkpoint_is_refused_by_name(tmp_path, capsys):
    """Qwen3-Omni's thinker is a mixture of experts with other inputs: not half-loaded."""
    d = tmp_path / "q3omni"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
    err = _fails(["--model", str(d), "--data", clip_rows(tmp_path, n=2), "--out",
                  str(tmp_path / "r")], capsys)
    assert "config error" in err and "Qwen3-Omni" in err
