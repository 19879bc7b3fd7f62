"""Vision-language models (the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families): loading without
torchvision, prompts with images, the multimodal RoPE positions, and the images of every
forward (sampling, teachers, reference, loss, evaluation), and the check that every image of
a data file reads (the embedded image task's tiny Qwen3-VL is engine/toy/models.py). An image
is a file path or the encoded bytes of a PNG / JPEG (Parquet image columns, generated tasks).

A Qwen-VL prompt holds one `<|image_pad|>` placeholder per image, written by the tokenizer's
chat template, which must become as many image tokens as the vision tower emits for that image:
its patch grid t x h x w, merged spatial_merge_size^2 patches to one token (`expand_images`).
The image processor is transformers' PIL one (`backend="pil"`): PyPI's torchvision does not load
against the CPU torch build, and the processor class that bundles tokenizer and image processor
checks for a torchvision video processor, so the two are used side by side here instead.

Positions. Text tokens have one position; image tokens have three (time, row, column: M-RoPE),
and the text after an image continues from the largest position before it, not from its token
count. `rope_positions` asks the model (`get_rope_index`), which skips left padding. A row
without images needs nothing special: 1-D positions that skip the padding (rollout.positions)
give every M-RoPE component the same value, which is what the model computes for text.
"""
import functools
import io
import os

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import data

IMAGE_PAD = "<|image_pad|>"


def is_vision_language(path_or_config) -> bool:
    """Whether a checkpoint (directory or hub id) or config is an image-text-to-text model."""
    config = (AutoConfig.from_pretrained(path_or_config) if isinstance(path_or_config, str)
              else path_or_config)
    return getattr(config, "vision_config", None) is not None


def load(path: str, *, dtype=torch.float32):
    """(model, tokenizer) of a vision-language checkpoint, on CPU torch with or without
    torchvision; the tokenizer carries the image processor (`tok.image_processor`)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "preprocessor_config.json")):
        raise FileNotFoundError(f"{path}: a vision-language model directory needs "
                                f"preprocessor_config.json (its image processor)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    processor = image_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    tok.image_processor = processor  # prompts with images are built from the tokenizer (row_images)
    return model, tok


def freeze_vision_tower(model, source: str = "--model") -> int:
    """Stop training a vision-language model's vision tower (its patch embedding, blocks and
    merger: the module `visual` of the Qwen-VL families, `vision_tower` elsewhere), as
    EasyR1's and verl's `freeze_vision_tower` do; only the language model learns. Returns the
    number of frozen weights."""
    towers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("visual", "vision_tower")]
    if not towers:
        raise ValueError(f"--freeze-vision: {source} has no vision tower (a module named "
                         f"'visual' or 'vision_tower'); it is for vision-language models")
    towers[0].requires_grad_(False)
    return sum(p.numel() for p in towers[0].parameters())


def image_processor(path: str):
    """The checkpoint's image processor with the PIL backend, which needs no torchvision."""
    return AutoImageProcessor.from_pretrained(path, backend="pil")


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


def open_image(ref):
    """A PIL image from a file path or from encoded bytes."""
    from PIL import Image
    return Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)


@functools.lru_cache(maxsize=4096)
def _pixels(processor, ref):
    """(pixel_values, patch grid) of one image (a path or bytes), processed once per run."""
    with open_image(ref) as im:
        px = processor(images=[im.convert("RGB")], return_tensors="pt")
    return px["pixel_values"], px["image_grid_thw"]


def row_images(tok, paths: list) -> tuple:
    """The processed images of one row (paths or bytes): ((pixel_values, grid), ...), () without
    images. The image processor travels with the tokenizer (`tok.image_processor`, set by
    `load`)."""
    if not paths:
        return ()
    processor = getattr(tok, "image_processor", None)
    if processor is None:
        raise ValueError("rows have images, but the model is not a vision-language model "
                         "(no image processor next to its tokenizer)")
    return tuple(_pixels(processor, p) for p in paths)


def expand_row(tok, ids: list[int], images: tuple) -> list[int]:
    """A rendered prompt's image placeholders, expanded for the row's processed images."""
    if not images:
        return ids
    merge = tok.image_processor.merge_size
    counts = [c for _, grid in images for c in image_tokens(grid, merge)]
    return expand_images(ids, tok.convert_tokens_to_ids(IMAGE_PAD), counts)


def placeholder_ids(tok) -> list[int]:
    """The vision special tokens a response must never contain (generate's banned_ids)."""
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>",
                                                   "<|vision_start|>", "<|vision_end|>")]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def forward_inputs(model, images: list | None, prompt_ids, prompt_mask, resp_ids=None,
                   resp_mask=None) -> dict:
    """The extra keyword arguments of a forward over prompt (+ response) for rows whose
    processed images are `images` (one tuple per row; Batch.images): pixel values and grids
    of every image in row order, which tokens are image tokens, and the M-RoPE positions.
    {} when no row has an image: the text path is unchanged."""
    if not images or not any(images):
        return {}
    ids, mask = prompt_ids, prompt_mask
    if resp_ids is not None:
        ids, mask = torch.cat([ids, resp_ids], 1), torch.cat([mask, resp_mask], 1)
    device = ids.device
    px = torch.cat([p for row in images for p, _ in row]).to(device)
    grid = torch.cat([g for row in images for _, g in row]).to(device)
    kinds = (ids == model.config.image_token_id).int()
    return dict(pixel_values=px, image_grid_thw=grid, mm_token_type_ids=kinds,
                position_ids=rope_positions(model, ids, mask, grid))


def rope_positions(model, ids: torch.Tensor, mask: torch.Tensor,
                   grid_thw: torch.Tensor | None) -> torch.Tensor:
    """(3, N, L) M-RoPE positions of left-padded rows whose images have the patch grids
    `grid_thw` (all images of all rows, in order), from the model's own `get_rope_index`."""
    inner = model  # the module with get_rope_index, under LoRA's and BaseView's wrappers
    while not hasattr(type(inner), "get_rope_index"):
        inner = (inner.get_base_model() if hasattr(inner, "get_base_model") else inner.model)
    kinds = (ids == model.config.image_token_id).int()  # 1 on image tokens, 0 on text
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=kinds, image_grid_thw=grid_thw,
                                  attention_mask=mask)
    return pos


def check_images(examples: list):
    """Every image a row names must exist and decode, before any training starts."""
    rows = [e for e in examples if e.images]
    if not rows:
        return
    try:
        import PIL  # noqa: F401  (open_image reads them with pillow)
    except ImportError:
        raise data.DataError(f"{rows[0].where}: rows have images; reading them needs pillow "
                        f"(pip install -e '.[vision]')") from None
    for e in rows:
        for k, p in enumerate(e.images, 1):
            try:
                with open_image(p) as im:
                    im.verify()
            except Exception as err:  # PIL raises many types for a bad file
                name = f"image {k} (bytes)" if isinstance(p, bytes) else f"image {p}"
                raise data.DataError(f"{e.where}: {name} cannot be read "
                                f"({type(err).__name__}: {err})") from None
