"""--dry-run: check a run, and say whether it fits, before renting the GPUs.

    python train.py --preset rlsd-qwen3-vl-8b --dry-run [--gpus 32] [--data train.jsonl]

With nothing but the model's config.json (a model directory, or for a recipe's hub id the copy
in recipes/models/), the model is built on the meta device (shapes, no memory), its parameters
counted, and the memory of one GPU estimated for FSDP2 over `--gpus` processes. The data file,
when given, is loaded and validated like a real run's. Nothing is downloaded or trained.

The estimate, per GPU, in bytes; P parameters (P_train of them trained: all, or LoRA's
adapters), W processes, c bytes per compute value (2 for bfloat16, 4 for float32), L layers,
H hidden, I MLP width, Q = heads x head_dim, KV = kv_heads x head_dim, V vocabulary:
    weights          4 P / W               float32 master weights, sharded (distributed.shard)
    gradients        4 P_train / W         float32, sharded
    optimizer        8 P_train / W         AdamW's two float32 moments, sharded
    teacher/ref      4 P / W per copy      frozen / sync / EMA teacher and KL reference copies
                                           (none with LoRA: the base with adapters off), and
                                           --rollout-refresh's rollout policy (K != 1)
    external         4 P_t / W each        OPD's --teacher models (several: each once), float32,
                                           sharded like the student
    gathered         c (root + 2 layer)    per model: the root (embeddings, head) stays gathered,
                                           one layer computes while the next is fetched
    activations      m S L A c             m rows per micro-batch, S = prompt + response tokens,
                                           A = 6H + 5Q + 4KV + 4I values saved per token and
                                           layer (a Qwen3 layer; measured on CPU in
                                           tests/test_presets.py to within 10%)
      checkpointed   m S (2 H L + A) c     each layer keeps its input; one layer recomputed
    LM-head chunk    3 x 4 min(N_chunk, m T V)   float32 logits, log-softmax and their gradient of
                                           one chunk (teachers.column_chunks; N_chunk = 128M on GPU)
    KV cache         R S L 2 KV c          the rollout: R rows per GPU sampled together
                                           (--rollout-micro-batch, else the whole local batch)
The peak is the static part (weights to gathered) plus the larger of the rollout (KV cache) and
the update (activations and one LM-head chunk). Not counted: the vision tower's activations,
the teacher's no-grad forward (one layer at a time), CUDA context and allocator slack
(budget 10-20% on top).
"""
import dataclasses
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

import data
from engine.toy import tasks
from engine import presets
from engine.config import DEFAULTS
from engine.teachers import LOGIT_CHUNK_ELEMENTS

GB = 1e9
PROMPT_TOKENS = 1024  # the prompt length assumed for S when no --max-prompt-tokens caps it lower


def model_config(cfg):
    """(transformers config, where it came from) of --model: 'toy', a directory, or a hub id
    whose config.json ships in recipes/models/."""
    if cfg.model in ("toy", "toy-init"):
        from engine.toy.models import build_toy_model, build_toy_tokenizer
        return build_toy_model(build_toy_tokenizer()).config, "the embedded toy model"
    path = cfg.model if os.path.isdir(cfg.model) else presets.model_config_dir(cfg.model)
    if path is None:
        raise SystemExit(f"--dry-run: no config.json for {cfg.model}: give a model directory, or "
                         f"a hub id with a copy in {presets.MODELS}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        from engine.rollout import refuse_remote_code
        raise SystemExit(refuse_remote_code(cfg.model)) from None
    return config, os.path.join(path, "config.json")


def meta_model(config):
    """The model on the meta device: every shape, no memory, no weights read. A Qwen2.5-Omni
    checkpoint is its thinker (vision.load trains nothing else)."""
    with torch.device("meta"):
        if getattr(config, "model_type", "") in ("qwen2_5_omni", "qwen2_5_omni_thinker"):
            from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker
            return Thinker._from_config(getattr(config, "thinker_config", config))
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        return auto.from_config(config)


def shapes(model, cfg) -> dict:
    """Parameter counts and the text model's dimensions."""
    text = model.config.get_text_config()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    def tower(name):  # a module path inside an encoder (lora.TOWERS)
        return bool(set(name.split(".")) & {"visual", "vision_tower", "audio_tower"})
    vision = sum(p.numel() for n, p in model.named_parameters() if tower(n) and "audio" not in n)
    audio = sum(p.numel() for n, p in model.named_parameters() if "audio_tower" in n.split("."))
    if cfg.lora_rank:  # r (in + out) per adapted linear layer (lora.py): A is r x in, B out x r
        targets = {t.strip() for t in cfg.lora_targets.split(",")}  # never inside the towers
        trained = sum(cfg.lora_rank * (m.in_features + m.out_features)
                      for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
                      and not tower(n))
    else:  # --freeze-vision / --freeze-towers: those weights get no gradient or moments
        trained = total - (vision + audio if cfg.freeze_towers else
                           vision if cfg.freeze_vision else 0)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return dict(total=total, trained=trained, layer=per_layer, layers=len(layers),
                vision=vision + audio, audio=audio,
                root=total - per_layer * len(layers) - vision - audio, H=text.hidden_size,
                I=text.intermediate_size, Q=text.num_attention_heads * head_dim,
                KV=text.num_key_value_heads * head_dim, V=text.vocab_size)


def activation_values(s: dict) -> int:
    """A: values a decoder layer saves for backward, per token (see the module docstring)."""
    return 6 * s["H"] + 5 * s["Q"] + 4 * s["KV"] + 4 * s["I"]


def model_copies(cfg) -> int:
    """Full copies of the weights besides the student (teachers.teacher_and_reference)."""
    moving = cfg.teacher_mode in ("sync", "ema")
    own = cfg.teacher_mode in ("frozen", "trust", "sync", "ema")
    if cfg.lora_rank:  # theta_0 is the student with adapters off; only a moving teacher copies
        return int(moving)
    return int(own) + int(cfg.kl_coef > 0 and (moving or not own))


def rollout_copy(cfg) -> int:
    """--rollout-refresh K != 1 keeps the policy that sampled the cached rollouts (replay.py)."""
    return int(cfg.algo in ("opd", "opsd") and cfg.rollout_refresh != 1)


def external_teachers(cfg) -> list:
    """[(name, shapes)] of OPD's --teacher models, each built on the meta device from its
    config.json (a directory, 'toy', or a hub id with a copy in recipes/models/)."""
    if cfg.teacher_mode != "external" or not cfg.teacher:
        return []
    from engine.teachers import teacher_specs
    out = []
    for name, path in teacher_specs(cfg.teacher):
        t_cfg = dataclasses.replace(cfg, model=path)
        out.append((name, shapes(meta_model(model_config(t_cfg)[0]), t_cfg)))
    return out


def estimate(s: dict, cfg, world: int, teachers: list = ()) -> dict:
    """Bytes per GPU, by the formula of the module docstring; `teachers`: external_teachers."""
    c = 2 if cfg.dtype == "bfloat16" else 4
    prompt = min(cfg.max_prompt_tokens or PROMPT_TOKENS, PROMPT_TOKENS)
    S, T = prompt + cfg.max_new_tokens, cfg.max_new_tokens
    rollout_rows = max(1, cfg.prompts_per_step * cfg.group_size // world)
    rollout_rows = min(cfg.rollout_micro_batch or rollout_rows, rollout_rows)
    update_rows = max(1, (cfg.mini_batch_size or cfg.prompts_per_step) * cfg.group_size // world)
    m = min(cfg.micro_batch_size or update_rows, update_rows)
    copies = model_copies(cfg) + rollout_copy(cfg)
    A = activation_values(s)
    full = m * S * s["layers"] * A * c
    checkpointed = m * S * (2 * s["H"] * s["layers"] + A) * c
    out = {
        "weights": 4 * s["total"] / world,
        "gradients": 4 * s["trained"] / world,
        "optimizer": 8 * s["trained"] / world,
        "teacher/ref copies": copies * 4 * s["total"] / world,
        "external teachers": sum(4 * t["total"] / world for _, t in teachers),
        "gathered": (1 + copies) * c * (s["root"] + 2 * s["layer"]) + c * s["vision"]
        + sum(c * (t["root"] + 2 * t["layer"] + t["vision"]) for _, t in teachers),
        "activations": checkpointed if cfg.gradient_checkpointing else full,
        "LM-head chunk": 3 * 4 * min(LOGIT_CHUNK_ELEMENTS["cuda"], m * T * s["V"]),
        "KV cache": rollout_rows * S * s["layers"] * 2 * s["KV"] * c,
    }
    static = sum(out[k] for k in ("weights", "gradients", "optimizer", "teacher/ref copies",
                                  "external teachers", "gathered"))
    update = out["activations"] + out["LM-head chunk"]
    out["peak"] = static + max(out["KV cache"], update)
    out["peak, other checkpointing"] = static + max(
        out["KV cache"], (full if cfg.gradient_checkpointing else checkpointed)
        + out["LM-head chunk"])
    out.update(S=S, prompt=prompt, rollout_rows=rollout_rows, m=m, copies=copies)
    return out


def main(cfg):
    """Print the model's size and the per-GPU memory estimate, validate --data; exit 0."""
    about = presets.load(cfg.preset, DEFAULTS)[0] if cfg.preset else {}
    world = cfg.gpus or about.get("gpus") or int(os.environ.get("WORLD_SIZE", "1"))
    config, source = model_config(cfg)
    model = meta_model(config)
    s = shapes(model, cfg)
    teachers = external_teachers(cfg)
    e = estimate(s, cfg, world, teachers)
    name = f"--preset {cfg.preset}, " if cfg.preset else ""
    print(f"dry run: {name}--algo {cfg.algo}, {cfg.model} ({source}), {world} GPU(s), "
          f"{cfg.dtype}" + (f", LoRA r={cfg.lora_rank}" if cfg.lora_rank else ""))
    print(f"parameters: {s['total'] / 1e9:.3f}B ({s['layers']} layers, hidden {s['H']}, vocabulary "
          f"{s['V']}" + (f", vision tower {(s['vision'] - s['audio']) / 1e9:.3f}B" if s["vision"] else "")
          + (f", audio tower {s['audio'] / 1e9:.3f}B" if s["audio"] else "")
          + f"); trained: {s['trained'] / 1e9:.4f}B")
    print(f"per GPU, FSDP2 over {world}: S = {e['prompt']} prompt (assumed) + {cfg.max_new_tokens} "
          f"response tokens; {e['rollout_rows']} rollout rows, micro-batches of {e['m']} rows; "
          f"{e['copies']} teacher/reference copies")
    for name, t in teachers:
        print(f"  external teacher {name}: {t['total'] / 1e9:.3f}B parameters, "
              f"{4 * t['total'] / world / GB:.2f} GB per GPU")
    for k in ("weights", "gradients", "optimizer", "teacher/ref copies", "external teachers",
              "gathered",
              "activations", "LM-head chunk", "KV cache"):
        print(f"  {k:<20} {e[k] / GB:9.2f} GB")
    other = "without" if cfg.gradient_checkpointing else "with"
    print(f"  {'peak':<20} {e['peak'] / GB:9.2f} GB   ({other} --gradient-checkpointing: "
          f"{e['peak, other checkpointing'] / GB:.2f} GB; add 10-20% for the CUDA context and "
          f"allocator)")
    if cfg.data != "toy":
        columns = {c: getattr(cfg, c + "_key") for c in data.COLUMNS}
        need = (cfg.context,) if cfg.context in ("solution", "rationale") else ()
        rows = tasks.load_data(cfg.data, "train", n_toy=0, columns=columns, need=need)
        print(f"data: {cfg.data}: {len(rows)} rows, the columns this run reads are present")
    print("dry run OK: nothing was trained or downloaded")
