"""Multimodal models: the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families (images, videos) and the
Qwen2.5-Omni thinker (images, videos, audio, a video's own audio track). Loading without
torchvision, prompts with media, the multimodal RoPE positions, and the media of every
forward (sampling, teachers, reference, loss, evaluation). Reading the files is media.py's.

A prompt holds one placeholder per medium, written by the tokenizer's chat template, which must
become as many tokens as the tower emits for it (`expand_row`):
    image  its patch grid t x h x w, merged spatial_merge_size^2 patches to one token
    video  likewise per temporal patch (two frames); Qwen3-VL writes each temporal patch as
           "<t seconds>" + vision start + its tokens + vision end instead
    audio  one token per 40 ms of features (media.audio_tokens); a video's own track
           (--use-audio-in-video, Qwen2.5-Omni) is interleaved with the video's tokens in 2 s
           chunks between audio-start and audio-end, as the official processor writes it
The processors are transformers' PIL image processor (`backend="pil"`) and Whisper's numpy
feature extractor; the video patches are media.video_pixels': PyPI's torchvision does not load
against the CPU torch build, and transformers' video processors and Processor classes need it.
What a tokenizer needs to expand placeholders travels with it (`tok.media_tokens`, set by `load`
from the model's config, as `tok.image_processor`, `tok.feature_extractor`, `tok.video_settings`).

Positions. Text tokens have one position; media tokens have three (time, row, column: M-RoPE),
and the text after a medium continues from the largest position before it, not from its token
count. `rope_positions` asks the model's own `get_rope_index` (each family has its own: Qwen3-VL
splits a video by frame, Qwen2.5-Omni spaces video tokens 25 positions a second and audio tokens
one each), which skips left padding. A text row needs nothing special: 1-D positions that skip
the padding (rollout.positions) are what the model computes for text.
"""
import collections
import dataclasses
import hashlib
import io
import json
import os

import numpy as np
import torch
from transformers import (AutoConfig, AutoFeatureExtractor, AutoImageProcessor,
                          AutoModelForImageTextToText, AutoTokenizer)

import data
from engine import media

IMAGE_PAD = "<|image_pad|>"
OMNI = ("qwen2_5_omni", "qwen2_5_omni_thinker")  # checkpoints whose thinker is loaded


@dataclasses.dataclass(frozen=True)
class Video:
    pixels: torch.Tensor       # (patches, C x temporal x p x p): media.video_pixels
    grid: torch.Tensor         # (1, 3): temporal patches, height and width in patches
    seconds_per_grid: float    # seconds one temporal patch spans
    timestamps: tuple          # each temporal patch's time, seconds (Qwen3-VL writes them)
    audio: torch.Tensor | None = None  # its own track's features (--use-audio-in-video)


@dataclasses.dataclass(frozen=True)
class Media:
    """One row's processed media; falsy for a text row."""
    images: tuple = ()  # (pixel_values, grid (1, 3)) each
    videos: tuple = ()  # Video each
    audios: tuple = ()  # (mel bins, frames) features of each audio clip

    def __bool__(self):
        return bool(self.images or self.videos or self.audios)

    def clips(self) -> list:
        """Every audio clip in the order its tokens come: the videos' tracks, then the rest."""
        return [v.audio for v in self.videos if v.audio is not None] + list(self.audios)


# ----------------------------------------------------------------------------------------
# Loading: the model, its tokenizer, and the processors that travel with the tokenizer
# ----------------------------------------------------------------------------------------

def is_vision_language(path_or_config) -> bool:
    """Whether a checkpoint (directory or hub id) or config is a multimodal model."""
    config = (AutoConfig.from_pretrained(path_or_config, trust_remote_code=False) if isinstance(path_or_config, str)
              else path_or_config)
    return (getattr(config, "vision_config", None) is not None
            or getattr(config, "model_type", "") in OMNI)


def family(config) -> str:
    """'omni', 'qwen3_vl', 'qwen2_5_vl' or 'qwen2_vl': whose conventions a model follows."""
    kind = getattr(config, "model_type", "")
    if kind.startswith("qwen2_5_omni"):
        return "omni"
    return "qwen3_vl" if kind.startswith("qwen3_vl") else (
        "qwen2_5_vl" if kind.startswith("qwen2_5_vl") else "qwen2_vl")


def media_tokens(config) -> dict:
    """The placeholder ids and timing constants of a model, from its config."""
    c = getattr(config, "thinker_config", None) or config
    get = lambda *names: next((getattr(c, n) for n in names  # noqa: E731
                               if getattr(c, n, None) is not None), None)
    return dict(family=family(c), image=get("image_token_id", "image_token_index"),
                video=get("video_token_id", "video_token_index"),
                audio=get("audio_token_id", "audio_token_index"),
                vision_start=get("vision_start_token_id"), vision_end=get("vision_end_token_id"),
                audio_bos=get("audio_start_token_id"), audio_eos=get("audio_end_token_id"),
                per_second=get("position_id_per_seconds") or 25,
                chunk_seconds=get("seconds_per_chunk") or 2)


def load(path: str, *, dtype=torch.float32):
    """(model, tokenizer) of a multimodal checkpoint, on CPU torch with or without torchvision.
    A Qwen2.5-Omni checkpoint loads its thinker alone (the talker speaks; nothing here trains
    it). The tokenizer carries the processors (`attach_processors`)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "preprocessor_config.json")):
        raise FileNotFoundError(f"{path}: a multimodal model directory needs "
                                f"preprocessor_config.json (its image processor)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type.startswith("qwen3_omni"):
        raise ValueError(f"{path}: Qwen3-Omni is a mixture-of-experts thinker with its own "
                         f"inputs and positions; this project supports Qwen2.5-Omni's thinker")
    if config.model_type in OMNI:
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    attach_processors(tok, path, model.config)
    return model, tok


def attach_processors(tok, path: str, config):
    """The checkpoint's processors on the tokenizer, which builds every prompt: the image
    processor (PIL backend), the audio feature extractor (models with an audio tower), the
    video settings, and the placeholder ids."""
    tok.image_processor = image_processor(path)
    tok.media_tokens = media_tokens(config)
    if getattr(config, "audio_config", None) is not None or tok.media_tokens["audio"] is not None:
        tok.feature_extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=False)
    tok.video_settings = video_settings(path)


def image_processor(path: str):
    """The checkpoint's image processor with the PIL backend, which needs no torchvision."""
    return AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)


def video_settings(path: str) -> dict:
    """How the checkpoint samples and sizes video frames (video_preprocessor_config.json, or
    the video keys of preprocessor_config.json); {} for the image processor's own sizes and
    2 frames a second."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        f = os.path.join(path, name) if os.path.isdir(path) else None
        if f and os.path.exists(f):
            with open(f) as fh:
                raw = json.load(fh)
            keep = {k: raw[k] for k in ("fps", "min_frames", "max_frames", "size", "min_pixels",
                                        "max_pixels") if raw.get(k) is not None}
            if name.startswith("video") or "fps" in keep:
                return keep
    return {}


def save_processors(tok, directory: str):
    """The processors beside a checkpoint's weights, so it reloads with them: the image
    processor and the feature extractor share preprocessor_config.json (as on the hub: each
    reads its own keys), the video settings go to video_preprocessor_config.json."""
    if getattr(tok, "image_processor", None) is None:
        return
    merged = tok.image_processor.to_dict()
    if getattr(tok, "feature_extractor", None) is not None:
        merged = {**tok.feature_extractor.to_dict(), **merged}
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(merged, f, indent=2, default=str)
    if getattr(tok, "video_settings", None):
        with open(os.path.join(directory, "video_preprocessor_config.json"), "w") as f:
            json.dump(tok.video_settings, f, indent=2)


def freeze_towers(model, source: str = "--model", *, audio: bool = True) -> int:
    """Stop training a multimodal model's encoders: the vision tower (its patch embedding,
    blocks and merger: `visual` in the Qwen families, `vision_tower` elsewhere) and, with
    `audio`, the audio tower (`audio_tower`), as EasyR1's and verl's `freeze_vision_tower`
    do; only the language model learns. Returns the number of frozen weights."""
    names = ("visual", "vision_tower") + (("audio_tower",) if audio else ())
    towers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    if not towers:
        raise ValueError(f"--freeze-vision: {source} has no vision tower (a module named "
                         f"'visual' or 'vision_tower'); it is for vision-language models")
    for t in towers:
        t.requires_grad_(False)
    return sum(p.numel() for t in towers for p in t.parameters())


def freeze_vision_tower(model, source: str = "--model") -> int:
    """The vision tower alone (`freeze_towers` without the audio tower)."""
    return freeze_towers(model, source, audio=False)


# ----------------------------------------------------------------------------------------
# A row's media, processed once per run
# ----------------------------------------------------------------------------------------

_MEMO = collections.OrderedDict()  # processed media by their source: files are read once


def _memo(key, build):
    if key not in _MEMO:
        _MEMO[key] = build()
        if len(_MEMO) > 4096:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return _MEMO[key]


def _key(item):
    """A hashable stand-in for a media item: paths as they are, bytes and samples by digest."""
    if isinstance(item, bytes):
        return ("bytes", hashlib.sha1(item).hexdigest())
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], (int, float)):
        item = np.asarray(item, dtype=np.float32)  # audio samples from a JSON or Parquet row
    if isinstance(item, np.ndarray):
        return ("array", str(item.dtype), item.shape, hashlib.sha1(item.tobytes()).hexdigest())
    if isinstance(item, (list, tuple)):
        return tuple(_key(i) for i in item)
    if isinstance(item, dict):
        return tuple(sorted((k, _key(v)) for k, v in item.items()))
    return item


def open_image(ref):
    """A PIL image from a file path or from encoded bytes."""
    from PIL import Image
    return Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)


def _image(processor, ref):
    with open_image(ref) as im:
        px = processor(images=[im.convert("RGB")], return_tensors="pt")
    return px["pixel_values"], px["image_grid_thw"]


def _frame_processor(tok):
    """The image processor with the video's frame sizes (the checkpoint's video settings)."""
    s, proc = tok.video_settings or {}, tok.image_processor
    size = s.get("size") or {}
    low, high = size.get("shortest_edge", s.get("min_pixels")), size.get("longest_edge",
                                                                        s.get("max_pixels"))
    if low is None and high is None:
        return proc
    return _memo(("frames", id(proc), low, high), lambda: type(proc).from_dict(
        {**proc.to_dict(), "size": {"shortest_edge": low or proc.size["shortest_edge"],
                                    "longest_edge": high or proc.size["longest_edge"]}}))


def _video(tok, item, fps: float, audio_in_video: bool) -> Video:
    frames, rate = media.read_video(item, fps=fps)
    s, proc = tok.video_settings or {}, _frame_processor(tok)
    temporal = proc.temporal_patch_size
    target = float(s.get("fps") or fps)
    idx = media.sample_frames(len(frames), rate, target_fps=target, temporal=temporal,
                              min_frames=int(s.get("min_frames", temporal)),
                              max_frames=int(s.get("max_frames", 768)))
    pixels, grid = media.video_pixels(frames[idx], proc, temporal=temporal)
    padded = idx + [idx[-1]] * (-len(idx) % temporal)  # times of each temporal patch's frames
    times = tuple((padded[k] + padded[k + temporal - 1]) / 2 / rate
                  for k in range(0, len(padded), temporal))
    audio = _audio(tok, media.video_audio(item)) if audio_in_video else None
    return Video(pixels, grid, temporal / target, times, audio)


def _audio(tok, samples_rate) -> torch.Tensor:
    extractor = getattr(tok, "feature_extractor", None)
    if extractor is None:
        raise ValueError("rows have audio, but the model has no audio tower (no feature "
                         "extractor next to its tokenizer)")
    samples, rate = samples_rate
    return media.audio_features(media.resample(samples, rate, extractor.sampling_rate), extractor)


def row_media(tok, ex, *, fps: float = 2.0, audio_in_video: bool = False) -> Media:
    """The processed images, videos and audio clips of one row (an Example); an empty Media for
    a text row. Each file is read and processed once per run. `fps`: the frame rate of videos
    given as frames (else the file's), and the sampling rate when the checkpoint names none."""
    images, videos, audios = (getattr(ex, k, ()) or () for k in data.MEDIA)
    if not (images or videos or audios):
        return Media()
    if getattr(tok, "image_processor", None) is None and (images or videos):
        raise ValueError("rows have images or videos, but the model is not a vision-language "
                         "model (no image processor next to its tokenizer)")
    return Media(
        images=tuple(_memo(("image", id(tok.image_processor), _key(i)),
                           lambda i=i: _image(tok.image_processor, i)) for i in images),
        videos=tuple(_memo(("video", id(tok), fps, audio_in_video, _key(v)),
                           lambda v=v: _video(tok, v, fps, audio_in_video)) for v in videos),
        audios=tuple(_memo(("audio", id(tok), _key(a)),
                           lambda a=a: _audio(tok, media.read_audio(a))) for a in audios))


# ----------------------------------------------------------------------------------------
# Prompts: each placeholder becomes the tokens of its medium
# ----------------------------------------------------------------------------------------

def image_tokens(grid_thw: torch.Tensor, merge: int) -> list[int]:
    """(n_images, 3) patch grids -> the number of LM tokens of each image."""
    return [int(g.prod()) // (merge * merge) for g in grid_thw]


def expand_images(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """Each image placeholder token -> that image's number of image tokens, in order."""
    if ids.count(image_token_id) != len(counts):
        raise ValueError(f"the prompt has {ids.count(image_token_id)} image placeholders for "
                         f"{len(counts)} images")
    out, k = [], 0
    for i in ids:
        if i == image_token_id:
            out += [i] * counts[k]
            k += 1
        else:
            out.append(i)
    return out


def _interleaved(T: dict, video: Video, merge: int) -> list[int]:
    """A video and its own track, as Qwen2.5-Omni's processor writes them: audio-start, then per
    `chunk_seconds` the video tokens of that span followed by its audio tokens, audio-end."""
    t, h, w = (int(x) for x in video.grid[0])
    per_frame = h * w // (merge * merge)
    span = T["per_second"] * T["chunk_seconds"]  # positions per chunk
    v_pos = [int(k * video.seconds_per_grid * T["per_second"]) for k in range(t)
             for _ in range(per_frame)]
    n_audio = media.audio_tokens(video.audio.shape[-1])
    chunks = max(v_pos[-1] // span, (n_audio - 1) // span) + 1
    out = [T["audio_bos"]]
    for j in range(chunks):
        out += [T["video"]] * sum(j * span <= p < (j + 1) * span for p in v_pos)
        out += [T["audio"]] * len(range(j * span, min((j + 1) * span, n_audio)))
    return out + [T["audio_eos"]]


def expand_row(tok, ids: list[int], row: Media) -> list[int]:
    """A rendered prompt's placeholders expanded for the row's processed media (module
    docstring). The placeholders must match the media, one for one."""
    if not row:
        return ids
    T = getattr(tok, "media_tokens", None) or dict(
        family="qwen3_vl", image=tok.convert_tokens_to_ids(IMAGE_PAD))  # a tokenizer of old
    merge = tok.image_processor.merge_size if getattr(tok, "image_processor", None) else 2
    images, videos, audios = iter(row.images), iter(row.videos), iter(row.audios)
    need = {"image": len(row.images), "video": len(row.videos), "audio": len(row.audios)}
    found = {k: ids.count(T.get(k)) for k in need if T.get(k) is not None}
    if any(found.get(k, 0) != n for k, n in need.items()):
        raise ValueError(f"the prompt has {found} placeholders for {need} media")
    out = []
    for i, tid in enumerate(ids):
        if tid == T["image"]:
            out += [tid] * image_tokens(next(images)[1], merge)[0]
        elif tid == T.get("video"):
            v = next(videos)
            t, h, w = (int(x) for x in v.grid[0])
            per_frame = h * w // (merge * merge)
            if T["family"] == "qwen3_vl":  # "<t seconds>" + start + a frame's tokens + end each
                if out and out[-1] == T["vision_start"]:
                    out.pop()  # the chat template's wrapper, replaced by one per frame
                for ts in v.timestamps:
                    out += tok(f"<{ts:.1f} seconds>", add_special_tokens=False)["input_ids"]
                    out += [T["vision_start"]] + [tid] * per_frame + [T["vision_end"]]
            elif v.audio is not None:
                out += _interleaved(T, v, merge)
            else:
                out += [tid] * (t * per_frame)
        elif tid == T.get("audio"):
            out += [tid] * media.audio_tokens(next(audios).shape[-1])
        elif T["family"] == "qwen3_vl" and tid == T.get("vision_end") and i > 0 \
                and ids[i - 1] == T.get("video"):
            continue  # the wrapper's end, replaced above
        else:
            out.append(tid)
    return out


def encode(tok, processor, model_config, text: str, images: list, *, chat_kwargs=None):
    """(ids, pixel_values, image_grid_thw) of a user turn with `images` (PIL) before `text`,
    rendered by the tokenizer's chat template and with each placeholder expanded."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True, **(chat_kwargs or {}))
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    if not images:
        return ids, None, None
    px = processor(images=images, return_tensors="pt")
    counts = image_tokens(px["image_grid_thw"], processor.merge_size)
    ids = expand_images(ids, model_config.image_token_id, counts)
    return ids, px["pixel_values"], px["image_grid_thw"]


MEDIA_KINDS = ("image", "video", "audio")


def media_token_counts(tok, ids: torch.Tensor) -> dict:
    """{kind: (N,) number of that medium's tokens in each row of `ids`} (image, video, audio)."""
    T = getattr(tok, "media_tokens", None) or {"image": tok.convert_tokens_to_ids(IMAGE_PAD)}
    return {k: (ids == T[k]).sum(1) if T.get(k) is not None else torch.zeros(len(ids), dtype=torch.long)
            for k in MEDIA_KINDS}


def expected_media_tokens(tok, rows: list) -> dict:
    """{kind: (N,) tokens each row's processed media expand to} (`expand_row` of one
    placeholder per medium): what every forward over the row must hold."""
    T = getattr(tok, "media_tokens", None) or {"image": tok.convert_tokens_to_ids(IMAGE_PAD)}
    counts = {k: [] for k in MEDIA_KINDS}
    for r in rows:
        r = r or Media()
        ids = ([T["image"]] * len(r.images) + [T.get("video")] * len(r.videos)
               + [T.get("audio")] * len(r.audios))
        out = expand_row(tok, ids, r) if r else []
        for k in MEDIA_KINDS:
            counts[k].append(sum(1 for t in out if T.get(k) is not None and t == T[k]))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in counts.items()}


def placeholder_ids(tok) -> list[int]:
    """The media special tokens a response must never contain (generate's banned_ids)."""
    T = getattr(tok, "media_tokens", None) or {}
    ids = {v for k, v in T.items() if k in ("image", "video", "audio", "vision_start",
                                             "vision_end", "audio_bos", "audio_eos")}
    ids |= {tok.convert_tokens_to_ids(t) for t in (IMAGE_PAD, "<|video_pad|>",
                                                   "<|vision_start|>", "<|vision_end|>")}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


# ----------------------------------------------------------------------------------------
# The media of a forward: pixels, features and positions
# ----------------------------------------------------------------------------------------

def forward_inputs(model, rows: list | None, prompt_ids, prompt_mask, resp_ids=None,
                   resp_mask=None) -> dict:
    """The extra keyword arguments of a forward over prompt (+ response) for rows whose
    processed media are `rows` (one Media per row; Batch.media): the pixels and grids of every
    image and video in row order, the audio features (zero-padded, with their mask), which
    tokens are which medium, and the positions. {} when no row has media: the text path is
    unchanged."""
    if not rows or not any(rows):
        return {}
    ids, mask = prompt_ids, prompt_mask
    if resp_ids is not None:
        ids, mask = torch.cat([ids, resp_ids], 1), torch.cat([mask, resp_mask], 1)
    device, omni = ids.device, family(model.config) == "omni"
    images = [im for r in rows if r for im in r.images]
    videos = [v for r in rows if r for v in r.videos]
    clips = [c for r in rows if r for c in r.clips()]
    out, grids = {}, {}
    if images:
        out["pixel_values"] = torch.cat([p for p, _ in images]).to(device)
        out["image_grid_thw"] = grids["image_grid_thw"] = torch.cat([g for _, g in images]).to(device)
    if videos:
        out["pixel_values_videos"] = torch.cat([v.pixels for v in videos]).to(device)
        out["video_grid_thw"] = grids["video_grid_thw"] = torch.cat([v.grid for v in videos]).to(device)
        seconds = torch.tensor([v.seconds_per_grid for v in videos], device=device)
        if omni:
            out["video_second_per_grid"] = grids["second_per_grid"] = seconds
        elif family(model.config) == "qwen2_5_vl":
            out["second_per_grid_ts"] = grids["second_per_grid"] = seconds
    if clips:
        L = max(c.shape[-1] for c in clips)
        out["input_features"] = torch.stack([torch.nn.functional.pad(c, (0, L - c.shape[-1]))
                                             for c in clips]).to(device)
        out["feature_attention_mask"] = torch.stack(
            [(torch.arange(L) < c.shape[-1]).long() for c in clips]).to(device)
        grids["audio_lengths"] = out["feature_attention_mask"].sum(-1)
    if any(v.audio is not None for v in videos):
        out["use_audio_in_video"] = grids["audio_in_video"] = True
    if not omni:
        out["mm_token_type_ids"] = token_types(model, ids)
    out["position_ids"] = rope_positions(model, ids, mask, **grids)
    return out


def token_types(model, ids: torch.Tensor) -> torch.Tensor:
    """1 on image tokens, 2 on video tokens, 0 on text (the Qwen-VL families' mm_token_type_ids)."""
    c = model.config
    kinds = (ids == c.image_token_id).int()
    video = getattr(c, "video_token_id", None)
    return kinds + 2 * (ids == video).int() if video is not None else kinds


def _inner(model):
    """The module with get_rope_index, under LoRA's and BaseView's wrappers."""
    inner = model
    while not hasattr(type(inner), "get_rope_index"):
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner.model
    return inner


def rope_positions(model, ids: torch.Tensor, mask: torch.Tensor,
                   image_grid_thw: torch.Tensor | None = None, *,
                   video_grid_thw: torch.Tensor | None = None, second_per_grid=None,
                   audio_lengths=None, audio_in_video: bool = False) -> torch.Tensor:
    """(3, N, L) positions of left-padded rows whose media have these grids (all of all rows,
    in order), from the model's own `get_rope_index`."""
    inner = _inner(model)
    if family(model.config) == "omni":
        if image_grid_thw is None and video_grid_thw is None:  # audio alone: text positions
            return positions_1d(mask)
        pos, _ = inner.get_rope_index(ids, image_grid_thw=image_grid_thw,
                                      video_grid_thw=video_grid_thw, attention_mask=mask,
                                      use_audio_in_video=audio_in_video,
                                      audio_seqlens=audio_lengths,
                                      second_per_grids=second_per_grid)
        return pos
    extra = {"second_per_grid_ts": second_per_grid} if second_per_grid is not None else {}
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=token_types(model, ids),
                                  image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                  attention_mask=mask, **extra)
    return pos


def positions_1d(mask: torch.Tensor) -> torch.Tensor:
    """(3, N, L) text positions that skip the left padding, the same in all three rows."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)


def check_model(tok, examples: list, *, audio_in_video: bool = False, source: str = "--model"):
    """The rows' media against the model: images or videos need a vision tower, audio clips
    (or a video's own track) an audio tower. A ValueError naming the first row otherwise."""
    vision_ok = getattr(tok, "image_processor", None) is not None
    audio_ok = getattr(tok, "feature_extractor", None) is not None
    if audio_in_video and not audio_ok:
        raise ValueError(f"--use-audio-in-video: {source} has no audio tower (Qwen2.5-Omni has)")
    for e in examples:
        if (e.images or e.videos) and not vision_ok:
            raise ValueError(f"{e.where}: the row has images or videos, but {source} is not a "
                             f"vision-language model")
        if e.audios and not audio_ok:
            raise ValueError(f"{e.where}: the row has audio, but {source} has no audio tower "
                             f"(Qwen2.5-Omni's thinker has one)")


def check_media(examples: list, *, fps: float = 2.0, audio_in_video: bool = False):
    """Every image, video and audio clip a row names must exist and decode, before any
    training starts; one DataError naming the row otherwise."""
    rows = [e for e in examples if e.images]
    if rows:
        try:
            import PIL  # noqa: F401  (open_image reads them with pillow)
        except ImportError:
            raise data.DataError(f"{rows[0].where}: rows have images; reading them needs "
                                 f"pillow (pip install -e '.[vision]')") from None
    for e in rows:
        for k, p in enumerate(e.images, 1):
            try:  # decoded, as training will: valid chunks can still hold garbage pixels
                with open_image(p) as im:
                    im.load()
            except Exception as err:  # PIL raises many types for a bad file
                name = f"image {k} (bytes)" if isinstance(p, bytes) else f"image {p}"
                raise data.DataError(f"{e.where}: {name} cannot be read "
                                     f"({type(err).__name__}: {err})") from None
    media.check_media(examples, fps=fps, audio_in_video=audio_in_video)
