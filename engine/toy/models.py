"""The embedded world's tiny models, real Hugging Face architectures with random weights.

    build_toy_tokenizer  a character-level tokenizer in Hugging Face format (the arithmetic
                         task's characters, plus any extra), saved and loaded like any other
    build_toy_model      a ~0.3M-parameter Qwen3: the arithmetic task's student
    toy_vlm              a ~0.2M-parameter Qwen3-VL with a PIL image processor: the shapes
                         task's student (build_toy_vlm saves one as a checkpoint directory)

They are warm-started on their tasks by warmstart.py; everything else treats them as any
checkpoint of their family.
"""
import torch

from engine import vision
from engine.defaults import TOY_CONTEXT
from engine.toy import arithmetic, shapes

TOY_SPECIALS = ["<pad>", "<eos>", "<unk>"]
# the toy chat template: the user text, a newline, and ':' as the generation prompt
TOY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}:{% endif %}")


def build_toy_tokenizer(extra_chars: str = ""):
    """A character-level tokenizer in Hugging Face format (saved and loaded like any other)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(TOY_SPECIALS + sorted(set(arithmetic.TOY_CHARS + extra_chars)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char, one token
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                 unk_token="<unk>")
    hf.chat_template = TOY_CHAT_TEMPLATE
    return hf


def build_toy_model(tokenizer, *, seed: int = 0, **overrides):
    """A ~0.3M-parameter Qwen3 (a real HF architecture) with random weights. `overrides` change
    config fields (the memory benchmark uses vocab_size=151936 with a tiny hidden size)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    fields = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=288,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, max_position_embeddings=TOY_CONTEXT, tie_word_embeddings=True,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=None)
    cfg = Qwen3Config(**{**fields, **overrides})
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)



VISION_SPECIALS = ["<|vision_start|>", vision.IMAGE_PAD, "<|vision_end|>", "<|video_pad|>"]
TOY_VLM_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}:{% endif %}")


def toy_vlm(*, seed: int = 0, hidden: int = 64, layers: int = 2, rope_theta: float = 10000.0,
            head_dim: int = 16):
    """(model, tokenizer) of a tiny Qwen3-VL with random weights: the toy's character tokenizer
    plus the colour letters of the image task and the vision special tokens, and a PIL image
    processor (16-pixel patches, 2 x 2 merged) as `tok.image_processor`. M-RoPE gives half of
    a head's head_dim / 2 frequencies to the text/time axis and a quarter to each of the
    image's height and width (Qwen3-VL's [24, 20, 20] at 128 is close to this)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    tok = toy_vlm_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIALS}
    if head_dim % 8 or hidden % head_dim:
        raise ValueError(f"toy_vlm: head_dim {head_dim} must be a multiple of 8 dividing hidden {hidden}")
    heads = hidden // head_dim
    q = head_dim // 8  # frequencies per quarter
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                         max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                          "mrope_section": [2 * q, q, q], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=hidden, deepstack_visual_indexes=[0],
                           num_position_embeddings=64),
        image_token_id=ids[vision.IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config), tok


def toy_vlm_tokenizer(max_pixels: int = 128 * 128):
    """The tiny Qwen3-VL's tokenizer: the toy's characters, the shapes task's colour letters,
    the vision special tokens and a chat template that places them, with a PIL image processor
    (16-pixel patches, 2 x 2 merged, at most `max_pixels` per image) as `tok.image_processor`."""
    from transformers import Qwen2VLImageProcessorPil
    tok = build_toy_tokenizer(extra_chars=shapes.CHARS)
    tok.add_special_tokens({"additional_special_tokens": VISION_SPECIALS})
    tok.chat_template = TOY_VLM_TEMPLATE
    tok.image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                   temporal_patch_size=2, min_pixels=32 * 32,
                                                   max_pixels=max_pixels)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIALS}
    tok.media_tokens = dict(family="qwen3_vl", image=ids[vision.IMAGE_PAD],
                            video=ids["<|video_pad|>"], vision_start=ids["<|vision_start|>"],
                            vision_end=ids["<|vision_end|>"], audio=None)
    return tok


# the tiny Qwen2.5-Omni thinker's placeholders, and a chat template that writes them as the
# real one does: <|vision_bos|><|IMAGE|><|vision_eos|>, the same for a video,
# <|audio_bos|><|AUDIO|><|audio_eos|> for an audio clip
OMNI_SPECIALS = ["<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>", "<|vision_bos|>", "<|vision_eos|>",
                 "<|audio_bos|>", "<|audio_eos|>"]
TOY_OMNI_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}:{% endif %}")


def toy_omni(*, seed: int = 0, hidden: int = 64, layers: int = 2, head_dim: int = 32,
             frame_pixels: int = 64 * 64):
    """(model, tokenizer) of a tiny Qwen2.5-Omni thinker with random weights: a vision tower
    (16-pixel patches, 2 x 2 merged, 2 frames a temporal patch), a Whisper-style audio tower
    (128 mel bins, 25 tokens a second) and a Qwen2 language model, the toy's characters plus
    the clips task's, and its processors on the tokenizer: a PIL image processor, Whisper's
    feature extractor, frames of at most `frame_pixels` pixels sampled 2 a second."""
    from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
                              Qwen2VLImageProcessorPil, WhisperFeatureExtractor)
    tok = build_toy_tokenizer(extra_chars=shapes.CHARS)
    tok.add_special_tokens({"additional_special_tokens": OMNI_SPECIALS})
    tok.chat_template = TOY_OMNI_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in OMNI_SPECIALS}
    heads = hidden // head_dim
    q = head_dim // 8  # M-RoPE: half the frequencies to time, a quarter to each image axis
    config = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2 * q, q, q]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=64),
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=64, d_model=32, output_dim=hidden,
                          # positions restart every 2 x n_window feature frames (Qwen2.5-Omni:
                          # 100, 2 s); 200 lets the tower tell the 4 seconds of a clip apart
                          n_window=200),
        image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_token_index=ids["<|AUDIO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"], vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"], tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    tok.image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                   temporal_patch_size=2, min_pixels=32 * 32,
                                                   max_pixels=frame_pixels)
    tok.feature_extractor = WhisperFeatureExtractor(feature_size=128)
    tok.video_settings = dict(fps=2.0, min_frames=2, max_frames=32,
                              size=dict(shortest_edge=32 * 32, longest_edge=frame_pixels))
    tok.media_tokens = vision.media_tokens(config)
    return model, tok


def save_toy(model, tok, directory: str) -> str:
    """A tiny model saved in Hugging Face format with its tokenizer and processors, loadable
    with rollout.load_model like any checkpoint of its family."""
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    vision.save_processors(tok, directory)
    return directory


def build_toy_vlm(directory: str, *, seed: int = 0, **sizes) -> str:
    """`toy_vlm` saved in Hugging Face format (weights, tokenizer, image processor) to
    `directory`, loadable with `load` like any Qwen3-VL checkpoint."""
    return save_toy(*toy_vlm(seed=seed, **sizes), directory)
