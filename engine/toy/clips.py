"""The embedded omni task (`--data clips`): what does a clip show, what does it sound like,
and in which seconds both?

The omni-modal counterpart of the shapes task (shapes.py), for the tiny Qwen2.5-Omni thinker
(`models.toy_omni`): OmniOPSD's setting (a video with its sound, a rationale for the teacher),
offline on a laptop CPU. A clip lasts 4 seconds: a video of 2 frames a second, 32 x 32 pixels,
one colour each second (r, g, b, y), so that each second is exactly one video token (2 frames a
temporal patch, 16-pixel patches merged 2 x 2); and a 16 kHz sound track that, each second,
plays a tone (330, 523 or 784 Hz) or is silent. A question is one of three kinds, a third of
the problems each (`KINDS`); the worked solution lists the seconds (1-4), then their number:

    clip + "Qr"    how many seconds show red?                      ->  "13=2"   (the video)
    clip + "Qt"    how many seconds have a tone?                   ->  "124=3"  (the sound)
    clip + "Qrt"   how many seconds show red while a tone sounds?  ->  "1=1"    (both)

So some questions need the picture, some the sound and a third both: the modality ablation at
evaluation (`eval.py --ablate audio|video`, `kind_of`) says whether the model uses each.

Privileged contexts (every kind an algorithm may show its teacher):
  answer     "1"
  solution   "1=1"
  hint       the seconds that show the colour, "13": what the frames say (none for a sound
             question)
  rationale  the seconds with a tone, "124": what the sound says (answer-free for a picture
             or a both question, as OmniOPSD's rationales describe the cues)

The warm start imitates a demonstrator who reads the frames and hears the sound on their own
questions, but on a both question does not listen: each second that shows the colour in
silence is counted anyway with probability --demo-slip (`careless_solution`); shown a
context, it answers carefully. So SFT teaches the model to read each modality and leaves a
habit on the questions that need both, which a reward, or a teacher told where the tones are
(OmniOPSD's rationale), can correct. Why this design, after the first one (every question a
both question) was measured: its 1000-step warm start answered 1 to every clip (45.8%, the
share of answer 1) and RL did not move it; a model this small did not learn to read the clip
from the combined question alone, while questions on one modality give each its own signal.
Train and test clips show each second's colour at random; the out-of-distribution split puts
the asked colour (or a tone) in 3 or 4 of the seconds. Problems go to train or test by a hash
of the clip and question.

Each second's frames carry a clock: the bottom-left quarter of the frame is a grey whose
level is the second. The vision tower sees each frame on its own (its positions are the
patch's row and column), so the clock is how a video token can say which second it is, as
a burned-in timestamp does; the audio tower has its own positions.
"""
import functools
import hashlib
import io
import random
import wave

import numpy as np
import torch

from data import Example
from engine import media
from engine.toy import shapes
from engine.toy.splits import draw_split, probe_heads, train_probes

SECONDS, FPS, SIZE = 4, 2, 32
TONES = (330.0, 523.0, 784.0)  # Hz
CHARS = shapes.CHARS  # the colours' letters
COLOURS = shapes.COLOURS


@functools.lru_cache(maxsize=None)  # 4 colours x 4 seconds x 41 shades: each PNG made once
def frame(colour: str, second: int, shade: int) -> bytes:
    """PNG bytes of one frame: the colour (its shade varied by `shade`) with the clock's grey
    (the second, 1-4) in the bottom-left quarter."""
    from PIL import Image
    a = np.empty((SIZE, SIZE, 3), np.uint8)
    a[:] = np.clip(np.array(COLOURS[colour]) + shade, 0, 255)
    a[SIZE // 2:, :SIZE // 2] = 255 * second // SECONDS
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)  # 4^4 = 256 tracks in all: each clip shares its bytes
def sound(tones: tuple) -> bytes:
    """WAV bytes (16 kHz, 16-bit mono) of the track: second k plays TONES[tones[k]] from 0.1 s
    to 0.9 s into the second (20 ms fades), or nothing when tones[k] is -1."""
    rate = media.AUDIO_RATE
    t = np.arange(rate) / rate
    ramp = np.clip(np.minimum(t - 0.1, 0.9 - t) / 0.02, 0, 1)
    track = np.concatenate([0.5 * ramp * np.sin(2 * np.pi * TONES[k] * t) if k >= 0
                            else np.zeros(rate) for k in tones])
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(track * 32767).astype("<i2").tobytes())
    return buf.getvalue()


KINDS = ("video", "audio", "both")  # what a question needs (module docstring)
TONE = "t"  # the question's letter for the sound


def kind_of(ex: Example) -> str:
    """Which modality a clips question needs: 'video', 'audio' or 'both'."""
    return "audio" if ex.prompt == TONE else "both" if ex.prompt.endswith(TONE) else "video"


def clips_example(rng: random.Random, *, ood: bool = False) -> tuple[Example, list, tuple]:
    """(example, each second's colour, each second's tone or -1) of one random clip and
    question (module docstring)."""
    colours = [rng.choice(CHARS) for _ in range(SECONDS)]
    tones = [rng.randrange(len(TONES)) if rng.random() < 0.5 else -1 for _ in range(SECONDS)]
    present = sorted(set(colours))
    colour = rng.choice(present) if rng.random() < 0.9 else rng.choice(CHARS)  # 10%: maybe 0
    kind = rng.choice(KINDS)
    if ood:  # the asked colour, or a tone, in 3 or 4 seconds
        colour = rng.choice(CHARS)
        for k in rng.sample(range(SECONDS), rng.randint(3, 4)):
            if kind == "audio":
                tones[k] = rng.randrange(len(TONES))
            else:
                colours[k] = colour
    frames = []
    for k, c in enumerate(colours, 1):
        frames += [frame(c, k, rng.randint(-20, 20))] * FPS  # a second's frames are the same
    shown = [k for k, c in enumerate(colours, 1) if c == colour]
    sounding = [k for k in range(1, SECONDS + 1) if tones[k - 1] >= 0]
    listed = {"video": shown, "audio": sounding,
              "both": [k for k in shown if k in sounding]}[kind]
    prompt = {"video": colour, "audio": TONE, "both": colour + TONE}[kind]
    ex = Example(prompt=prompt, answer=str(len(listed)),
                 solution="".join(map(str, listed)) + "=" + str(len(listed)),
                 hint="".join(map(str, shown)) if kind != "audio" else "",
                 rationale="".join(map(str, sounding)),
                 videos=[{"frames": frames, "fps": FPS}], audios=[sound(tuple(tones))])
    return ex, colours, tuple(tones)


def careless_solution(ex: Example, rng: random.Random, p: float) -> str:
    """The demonstrator that, on a both question, does not listen: each second that shows the
    colour in silence (in the hint, not in the solution) is counted anyway with probability
    p. A question on one modality it answers as it is."""
    if kind_of(ex) != "both":
        return ex.solution
    listed = set(ex.solution.split("=")[0])
    kept = [d for d in ex.hint if d in listed or rng.random() < p]
    return "".join(kept) + "=" + str(len(kept))


def without(ex: Example, medium: str) -> Example:
    """The example with its audio or its video removed (the modality ablation)."""
    import dataclasses
    return dataclasses.replace(ex, **{medium + "s": []})


def _split_of(ex: Example) -> str:
    h = hashlib.sha256(b"".join(ex.videos[0]["frames"]) + ex.audios[0] + ex.prompt.encode())
    return "test" if h.digest()[0] % 10 == 0 else "train"


@functools.lru_cache(maxsize=8)
def make_clips(split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n problems of a split: 'train', 'test' or 'ood' (the colour in 3 or 4 seconds)."""
    return draw_split("clips", split, n, seed, split_of=_split_of,
                      make=lambda rng, ood: clips_example(rng, ood=ood)[0],
                      key=lambda ex: (tuple(ex.videos[0]["frames"]), ex.audios[0], ex.prompt))


# ----------------------------------------------------------------------------------------
# Stage 0 of the warm start: the towers learn to see and to hear
# ----------------------------------------------------------------------------------------

def teach_towers(model, tok, *, steps: int = 600, seed: int = 0, batch: int = 16) -> dict:
    """Train the tiny thinker's vision and audio towers, through temporary linear heads, to
    say what each video token shows (its colour and second) and what each audio token hears
    (a tone or not, and its second), then centre both projectors. Returns the heads'
    accuracies on the last batch. The role of a real omni model's pretrained encoders, as
    shapes.teach_to_see is for the tiny Qwen3-VL (its docstring: why the second must be in the
    token, why centring, why the learning rate decays to zero)."""
    from engine import vision
    inner = model.model
    hidden = model.config.get_text_config().hidden_size
    # colour logits then second logits; tone or silence, then second
    see, hear = probe_heads(hidden, (len(CHARS) + SECONDS, 2 + SECONDS), seed)
    params = [p for m in (inner.visual, inner.audio_tower, see, hear) for p in m.parameters()]
    rng = random.Random(f"hear-{seed}")
    per_second = 25  # audio tokens a second (media.audio_tokens)

    def clips():
        drawn = [clips_example(rng) for _ in range(batch)]
        rows = [vision.row_media(tok, e) for e, _, _ in drawn]  # what a prompt would carry
        feats = torch.stack([r.audios[0] for r in rows])  # all clips last 4 s: no padding
        kw = dict(pixel_values_videos=torch.cat([r.videos[0].pixels for r in rows]),
                  video_grid_thw=torch.cat([r.videos[0].grid for r in rows]),
                  input_features=feats,
                  feature_attention_mask=torch.ones(feats.shape[0], feats.shape[-1], dtype=torch.long))
        colours = torch.tensor([CHARS.index(c) for _, cs, _ in drawn for c in cs])
        tones = torch.tensor([[int(t >= 0) for t in ts] for _, _, ts in drawn])
        return kw, colours, tones

    def features(kw):
        v = torch.cat(inner.get_video_features(kw["pixel_values_videos"],
                                               kw["video_grid_thw"]).pooler_output)
        a = inner.get_audio_features(kw["input_features"],
                                     kw["feature_attention_mask"]).last_hidden_state
        return v, a

    ce = torch.nn.functional.cross_entropy

    def batch_loss():
        kw, colours, tones = clips()
        v, a = features(kw)
        sv, sa = see(v), hear(a)
        second_v = torch.arange(len(v)) % SECONDS
        n_audio = a.shape[0] // batch
        token_time = torch.arange(n_audio) / per_second  # each audio token's start, seconds
        second_a = (token_time.long()).clamp(max=SECONDS - 1).repeat(batch)
        within = token_time - token_time.floor()
        sounding = ((within >= 0.1) & (within < 0.9)).repeat(batch)  # the tone's span
        tone_a = (tones.repeat_interleave(n_audio, 0)[torch.arange(len(a)), second_a]
                  * sounding.long())
        loss = (ce(sv[:, :len(CHARS)], colours) + ce(sv[:, len(CHARS):], second_v)
                + ce(sa[:, :2], tone_a) + ce(sa[:, 2:], second_a))
        return loss, dict(
            colour=(sv[:, :len(CHARS)].argmax(1) == colours).float().mean().item(),
            video_second=(sv[:, len(CHARS):].argmax(1) == second_v).float().mean().item(),
            tone=(sa[:, :2].argmax(1) == tone_a).float().mean().item(),
            audio_second=(sa[:, 2:].argmax(1) == second_a).float().mean().item())

    acc = train_probes(params, steps, batch_loss) or {}
    with torch.no_grad():  # centre both projectors: no common vector on every media token
        v, a = features(clips()[0])
        inner.visual.merger.mlp[-1].bias -= v.mean(0)
        inner.audio_tower.proj.bias -= a.mean(0)
    return acc

