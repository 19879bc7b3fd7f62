"""Video and audio: reading what a data row names, and turning it into what a model's towers take.

    read_video     frames (T, H, W, 3) uint8 and their rate: a video file or its bytes, decoded
                   with PyAV (`pip install -e '.[video]'`; no torch dependency), or a list or a
                   directory of frame images (no decoder needed)
    read_audio     mono float32 samples and their rate: WAV (the standard library's `wave`),
                   .npy, or any container PyAV decodes; a video's own audio track
    resample       to the model's rate: FFT resampling, an ideal low-pass at the lower Nyquist
                   frequency (what scipy.signal.resample computes), exact for band-limited audio
    sample_frames  which frames a model sees: `fps` frames per second, a whole number of
                   temporal patches, between min and max frames (Qwen2-VL's video processor rule)
    video_pixels   the frames as a vision tower's patches, without torchvision: each frame
                   resized and normalised by the model's own PIL image processor (so two
                   identical frames give exactly that processor's patches for the image), then
                   cut into temporal x spatial patches as transformers' video processors cut them
    audio_features the log-mel features of the model's feature extractor (Whisper's: numpy)
    check_media    every video and audio clip of a data file reads, before training starts

A video item is a path, bytes, a list of frame paths, or a dict {"path" | "bytes" | "frames",
"fps"} (frames as files or their bytes); frames given as images are taken as sampled at `fps`
(the item's, else --video-fps). An audio item is a path, bytes, or a dict {"path" | "bytes" |
"array", "sampling_rate"}; a .npy file holds samples at 16 kHz unless the item names its rate.
"""
import io
import math
import os
import wave

import numpy as np
import torch

import data

AUDIO_RATE = 16000  # Whisper's, and every Qwen-Omni audio tower's
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

def _av():
    try:
        import av
    except ImportError:
        raise data.DataError("decoding a video file needs PyAV: pip install -e '.[video]' (or "
                             "give the video as a list or a directory of frame images)") from None
    return av


def _frame_images(paths: list) -> np.ndarray:
    """(T, H, W, 3) uint8 of frame images given as files or encoded bytes."""
    from PIL import Image
    frames = []
    for p in paths:  # files, or their encoded bytes
        with Image.open(io.BytesIO(p) if isinstance(p, bytes) else p) as im:
            frames.append(np.asarray(im.convert("RGB")))
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"the frames differ in size: {sorted({f.shape for f in frames})}")
    return np.stack(frames)


def read_video(item, *, fps: float = 2.0) -> tuple[np.ndarray, float]:
    """(frames (T, H, W, 3) uint8, frames per second) of one video item (module docstring)."""
    if isinstance(item, dict):
        fps = float(item.get("fps") or fps)
        item = item.get("frames") or item.get("path") or item.get("bytes")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"its fps {fps} is not a positive finite number")
    if isinstance(item, (list, tuple)):
        return _frame_images(item), fps
    if isinstance(item, str) and os.path.isdir(item):
        names = sorted(n for n in os.listdir(item) if n.lower().endswith(_IMAGE_EXT))
        if not names:
            raise ValueError("the directory holds no frame images")
        return _frame_images([os.path.join(item, n) for n in names]), fps
    with _av().open(io.BytesIO(item) if isinstance(item, bytes) else item) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError("the video has no frames")
    return np.stack(frames), rate


def _wav(src) -> tuple[np.ndarray, int]:
    with wave.open(src) as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        raw = w.readframes(w.getnframes())
    if width == 3:  # 24-bit: widen to 32 by hand (numpy has no int24)
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16
             | b[:, 2].astype(np.int32) << 24).astype(np.float32) / 2**31
    else:
        kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        x = np.frombuffer(raw, kind).astype(np.float32)
        x = (x - 128) / 128 if width == 1 else x / 2 ** (8 * width - 1)
    return x.reshape(-1, channels).mean(1), rate


def _av_audio(src) -> tuple[np.ndarray, int]:
    """Any container PyAV decodes: its first audio track, down-mixed to mono float32."""
    av = _av()
    with av.open(src) as container:
        if not container.streams.audio:
            raise ValueError("it has no audio track")
        stream = container.streams.audio[0]
        rate = stream.rate
        mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = [r.to_ndarray().reshape(-1) for f in container.decode(stream)
                  for r in mono.resample(f)]
        chunks += [r.to_ndarray().reshape(-1) for r in mono.resample(None)]  # what it buffered
    if not chunks:
        raise ValueError("the audio track is empty")
    return np.concatenate(chunks).astype(np.float32), rate


def read_audio(item) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], samples per second) of one audio item; an empty clip
    or one with non-finite samples is a ValueError."""
    x, rate = _read_audio(item)
    if x.size == 0:
        raise ValueError("the audio clip has no samples")
    if not np.isfinite(x).all():
        raise ValueError("the audio clip holds non-finite samples")
    return x, rate


def _read_audio(item) -> tuple[np.ndarray, int]:
    rate = None
    if isinstance(item, dict):
        rate = item.get("sampling_rate")
        if item.get("array") is not None:
            return np.asarray(item["array"], dtype=np.float32).reshape(-1), int(rate or AUDIO_RATE)
        item = item.get("path") or item.get("bytes")
    if isinstance(item, bytes):
        return _wav(io.BytesIO(item)) if item[:4] == b"RIFF" else _av_audio(io.BytesIO(item))
    if item.lower().endswith(".npy"):
        x = np.load(item, allow_pickle=False)  # never unpickle a data file
        return np.asarray(x, dtype=np.float32).reshape(-1), int(rate or AUDIO_RATE)
    if item.lower().endswith(".wav"):
        return _wav(item)
    return _av_audio(item)


def video_audio(item) -> tuple[np.ndarray, int]:
    """The audio track of a video file (--use-audio-in-video)."""
    src = item.get("path") or item.get("bytes") if isinstance(item, dict) else item
    if not isinstance(src, (str, bytes)) or (isinstance(src, str) and os.path.isdir(src)):
        raise ValueError("a video given as frames has no audio track; give its file")
    return _av_audio(io.BytesIO(src) if isinstance(src, bytes) else src)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`x` at `rate` samples per second -> at `target`: FFT resampling (the spectrum cut or
    zero-padded to the new length, an ideal low-pass at the lower Nyquist frequency)."""
    if not (rate > 0 and target > 0 and math.isfinite(rate)):
        raise ValueError(f"a sample rate of {rate} Hz cannot be converted to {target} Hz")
    if rate == target:
        return x.astype(np.float32)
    n = max(1, round(len(x) * target / rate))
    spectrum = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spectrum), n // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n) * (n / len(x))
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------
# What the towers take
# ----------------------------------------------------------------------------------------

def sample_frames(total: int, fps: float, *, target_fps: float, temporal: int,
                  min_frames: int, max_frames: int) -> list[int]:
    """Frame indices: `target_fps` per second of a `total`-frame video at `fps`, a multiple of
    `temporal` between min and max frames (transformers' Qwen2VLVideoProcessor.sample_frames);
    a video shorter than one temporal patch keeps all its frames (padded later)."""
    limit = math.floor(min(max_frames, total) / temporal) * temporal
    n = min(max(total / fps * target_fps, min_frames), limit, total)
    n = math.floor(n / temporal) * temporal
    if n <= 0:
        return list(range(total))
    return torch.arange(0, total, total / n).int().tolist()[:n]


def video_pixels(frames: np.ndarray, processor, *, temporal: int):
    """(pixel_values (t h w, C temporal p p) float32, grid (1, 3) long): the frames through
    `processor` (a PIL image processor: resize, rescale, normalise) one at a time, then cut
    as transformers' video processors cut a video: the frame count padded to a multiple of
    `temporal` by repeating the last frame, (t, temporal, C, h/m, m, p, w/m, m, p) ->
    (t, h/m, w/m, m, m, C, temporal, p, p). Two identical frames give exactly the processor's
    patches of that image, which repeats it `temporal` times itself."""
    from PIL import Image
    p, m = processor.patch_size, processor.merge_size
    planes, grid = [], None
    for f in frames:
        out = processor(images=[Image.fromarray(f)], return_tensors="pt")
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        if grid not in (None, (gh, gw)):
            raise ValueError("the frames differ in size")
        grid = (gh, gw)
        C = out["pixel_values"].shape[1] // (processor.temporal_patch_size * p * p)
        x = out["pixel_values"].view(gh // m, gw // m, m, m, C, -1, p, p)[:, :, :, :, :, 0]
        planes.append(x.permute(4, 0, 2, 5, 1, 3, 6).reshape(C, gh * p, gw * p))  # C, H, W
    video = torch.stack(planes)
    if pad := -len(video) % temporal:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    (gh, gw), t, C = grid, len(video) // temporal, video.shape[1]
    x = video.view(t, temporal, C, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, C * temporal * p * p), torch.tensor([[t, gh, gw]])


def audio_features(samples: np.ndarray, extractor) -> torch.Tensor:
    """(mel bins, L) float32 log-mel features of mono samples at the extractor's rate, unpadded
    (`padding="longest"`: the official processor pads every clip to 300 s)."""
    out = extractor(samples, sampling_rate=extractor.sampling_rate, return_attention_mask=True,
                    padding="longest", return_tensors="pt")
    n = int(out["attention_mask"][0].sum())
    return out["input_features"][0, :, :n].float()


def audio_tokens(frames: int) -> int:
    """LM tokens of an audio clip of `frames` feature frames: the tower's two stride-2 steps
    (Qwen2.5-Omni's _get_feat_extract_output_lengths; 25 tokens a second at 16 kHz)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


# ----------------------------------------------------------------------------------------
# Every file of a data file reads, named by its row
# ----------------------------------------------------------------------------------------

def check_media(examples: list, *, fps: float = 2.0, audio_in_video: bool = False):
    """Read every video (its first frames) and audio clip of `examples`; a missing or
    unreadable one, or a sample rate that cannot be converted, is one DataError naming the row."""
    for e in examples:
        for kind, items in (("video", e.videos), ("audio", e.audios)):
            for k, item in enumerate(items, 1):
                name = (f"{kind} {k} (bytes)" if isinstance(item, bytes) else
                        f"{kind} {item if isinstance(item, str) else k}")
                try:
                    if kind == "video":
                        read_video(item, fps=fps)
                        if audio_in_video:
                            video_audio(item)
                    else:
                        x, rate = read_audio(item)
                        resample(x[:1], rate, AUDIO_RATE)
                except data.DataError:
                    raise
                except Exception as err:  # PyAV, PIL, wave raise many types for a bad file
                    raise data.DataError(f"{e.where}: {name} cannot be read "
                                         f"({type(err).__name__}: {err})") from None
