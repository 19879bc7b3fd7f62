"""The embedded omni task (`--data clips`): in which seconds of a clip does a colour show while
a tone sounds?

The omni-modal counterpart of the shapes task (shapes.py), for the tiny Qwen2.5-Omni thinker
(`models.toy_omni`): OmniOPSD's setting (a video with its sound, a rationale for the teacher),
offline on a laptop CPU. A clip lasts 4 seconds: a video of 2 frames a second, 32 x 32 pixels,
one colour each second (r, g, b, y), so that each second is exactly one video token (2 frames a
temporal patch, 16-pixel patches merged 2 x 2); and a 16 kHz sound track that, each second,
plays a tone (330, 523 or 784 Hz) or is silent. The question is a colour; the worked solution
lists the seconds (1-4) that show the colour while a tone sounds, then their number:

    clip + "Qr"   ->   "13=2"        answer 2

Neither modality alone answers it: the frames say which seconds show the colour, the sound
which seconds have a tone.

Privileged contexts (every kind an algorithm may show its teacher):
  answer     "2"
  solution   "13=2"
  hint       the seconds that show the colour, "123": what the frames say
  rationale  the seconds with a tone, "134": what the sound says (answer-free, as OmniOPSD's
             rationales describe the cues; the teacher still has to look at the frames)

The warm start imitates a demonstrator that, shown only the question, does not listen: each
second that shows the colour in silence is counted anyway with probability --demo-slip
(`careless_solution`); shown a context, it answers carefully. A reward (or a teacher that was
told where the tones are) is meant to correct the habit; measured at this scale, the 1000-step
warm start does not read the clip yet (it answers 1 to every clip) and RL does not fix that
(README, "Video and audio"). Train and test clips show each second's colour
at random; the out-of-distribution split shows the question's colour in 3 or 4 of the seconds,
where listening matters most. Problems go to train or test by a hash of the clip and question.

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


def clips_example(rng: random.Random, *, ood: bool = False) -> tuple[Example, list, tuple]:
    """(example, each second's colour, each second's tone or -1) of one random clip and
    question (module docstring)."""
    colours = [rng.choice(CHARS) for _ in range(SECONDS)]
    tones = tuple(rng.randrange(len(TONES)) if rng.random() < 0.5 else -1 for _ in range(SECONDS))
    present = sorted(set(colours))
    colour = rng.choice(present) if rng.random() < 0.9 else rng.choice(CHARS)  # 10%: maybe 0
    if ood:  # the colour in 3 or 4 seconds
        colour = rng.choice(CHARS)
        for k in rng.sample(range(SECONDS), rng.randint(3, 4)):
            colours[k] = colour
    frames = []
    for k, c in enumerate(colours, 1):
        frames += [frame(c, k, rng.randint(-20, 20))] * FPS  # a second's frames are the same
    shown = [k for k, c in enumerate(colours, 1) if c == colour]
    sounding = [k for k in range(1, SECONDS + 1) if tones[k - 1] >= 0]
    both = [k for k in shown if k in sounding]
    solution = "".join(map(str, both)) + "=" + str(len(both))
    ex = Example(prompt=colour, answer=str(len(both)), solution=solution,
                 hint="".join(map(str, shown)), rationale="".join(map(str, sounding)),
                 videos=[{"frames": frames, "fps": FPS}], audios=[sound(tones)])
    return ex, colours, tones


def careless_solution(ex: Example, rng: random.Random, p: float) -> str:
    """The demonstrator that does not listen: each second that shows the colour in silence
    (in the hint, not in the solution) is counted anyway with probability p."""
    listed = set(ex.solution.split("=")[0])
    kept = [d for d in ex.hint if d in listed or rng.random() < p]
    return "".join(kept) + "=" + str(len(kept))


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

