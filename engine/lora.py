"""LoRA: train low-rank adapters instead of every weight (Hu et al. 2021, arXiv 2106.09685).

Each targeted linear layer W (d_out x d_in) gets W + (alpha / r) * B @ A with A (r x d_in)
random and B (d_out x r) zero, so the adapted model starts exactly at the base model and
only A and B (a few percent of the weights, for r = 64) are trained, saved and given AdamW
moments. The adapters come from `peft` (the `lora` extra), so a checkpoint is a standard
PEFT adapter directory: `PeftModel.from_pretrained(base, checkpoint)` loads it and
`.merge_and_unload()` folds it into plain weights.

A second gift of LoRA: the initial policy theta_0 is the student with its adapters switched
off. OPSD's fixed teacher is exactly that ("--fixed_teacher requires LoRA" in its code), and
so are the KL reference and PTD-PO's frozen reference here: `BaseView` scores with the
student's own (frozen) weights, adapters disabled, instead of a second copy of the model.
Teachers that move (sync, EMA, trust) still get a copy of their own.

The LM head and the embeddings are never targeted: the chunked loss applies the head outside
the model's forward (teachers.lm_head_logits), where an adapter on it would be skipped.
"""
import json
import os
import re

# every linear layer inside a Qwen / Llama / Mistral decoder layer (OPSD: q/k/v/o/gate/up/down)
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
NEVER = ("lm_head", "embed_tokens")  # see the module docstring
# a multimodal model's encoders keep their weights: adapters go on the language model only
# (a Whisper-style audio tower also has q_proj / k_proj / v_proj)
TOWERS = ("visual", "vision_tower", "audio_tower")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise SystemExit("--lora-rank needs peft: pip install -e '.[lora]'") from None
    return peft


def add_lora(model, *, rank: int, alpha: float, dropout: float, targets: str):
    """The model wrapped with fresh adapters on `targets` (comma-separated module names); only
    the adapters require grad. Fails naming the target when a name matches no linear layer."""
    peft = _peft()
    names = [t.strip() for t in targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
               if type(m).__name__ == "Linear" and not set(n.split(".")) & set(TOWERS)}
    for t in names:
        if t in NEVER:
            raise SystemExit(f"--lora-targets {t}: the LM head and embeddings cannot be adapted "
                             f"here (the chunked loss applies the head outside the forward)")
        if t not in present:
            raise SystemExit(f"--lora-targets {t}: no linear layer of that name in the model "
                             f"(it has {', '.join(sorted(present))})")
    # a regular expression (peft matches it against each module's full name): the named
    # layers, outside the towers
    towers, layers = "|".join(TOWERS), "|".join(re.escape(t) for t in names)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=rf"^(?!(.*\.)?({towers})\.).*\b({layers})$",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class BaseView:
    """The base model theta_0 inside a LoRA student: every forward runs with the adapters off.
    Not a module of its own (no weights, nothing to shard or to checkpoint); the student's
    base weights are frozen, so this never moves."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_base_model(self):  # the transformers model, whose forward's signature is read
        return self.model.get_base_model()

    @property
    def config(self):
        return self.model.config


# ----------------------------------------------------------------------------------------
# Checkpoints: the adapters only, in PEFT's file format
# ----------------------------------------------------------------------------------------

# PEFT names a parameter `...q_proj.lora_A.default.weight` in the model and
# `...q_proj.lora_A.weight` in the file (the adapter's name, 'default', is dropped)
_IN_MODEL = re.compile(r"\.(lora_[AB])\.default\.")
_IN_FILE = re.compile(r"\.(lora_[AB])\.")


def adapter_state(full_state: dict) -> dict:
    """The adapters of a full (gathered) state dict, named as in adapter_model.safetensors."""
    return {_IN_MODEL.sub(r".\1.", k): v for k, v in full_state.items() if _IN_MODEL.search(k)}


def model_state(adapters: dict) -> dict:
    """adapter_model.safetensors names -> the model's parameter names (for load_state_dict)."""
    return {_IN_FILE.sub(r".\1.default.", k): v for k, v in adapters.items()}


def save_adapter_config(model, directory: str):
    """adapter_config.json (PEFT's own writer), naming the base model this run started from."""
    model.peft_config["default"].save_pretrained(directory)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_merged(path: str, load_base):
    """A LoRA checkpoint as a plain model: its base (named in adapter_config.json, loaded with
    `load_base(name)` -> (model, tokenizer)), the adapters loaded by PEFT and merged in."""
    peft = _peft()
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        base_name = json.load(f).get("base_model_name_or_path")
    if not base_name:
        raise FileNotFoundError(f"{path}/{ADAPTER_CONFIG}: no base_model_name_or_path")
    model, _ = load_base(base_name)
    return peft.PeftModel.from_pretrained(model, path).merge_and_unload()
