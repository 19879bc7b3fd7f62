"""One command that measures the GPU path: ready on CPU, run the day a GPU is lent.

    python tools/bench.py --gpu-suite --out runs/gpu-suite           # one H100 / H200
    python tools/bench.py --gpu-suite --device cpu --tiny --out DIR  # every section, tiny shapes

From a clean checkout, offline: the models are built with random weights from the config.json
files shipped in recipes/models/ (Qwen3-0.6B, Qwen3-VL-2B-Thinking), the prompts written by
the toy tokenizer (the models keep their full vocabularies and LM heads). Sections:

    bandwidth   the device's memory bandwidth, from a timed copy (read + write), not a spec sheet
    rollout     128 rows x 256 new tokens, bf16, --generation dynamic / static / compiled, as
                train.py samples (autocast over float32 master weights), and dynamic again
                with bf16 weights: tokens/s, ms per decode step, and the ratio to the floor
                (the bytes one decode step must read: the weights, 2 bytes each, plus the KV
                cache at the average length, over the measured bandwidth)
    forward     teacher-forced forward tokens/s over the same tokens (the compute side)
    steps       one RLSD and one GRPO step (16 prompts x 8, 256 tokens, bf16), after one
                warm-up step each: step time, peak memory, their ratio
    vlm         two RLSD steps of a Qwen3-VL-2B-shaped model with 448 x 448 images
    memory      the RLSD step again with --gradient-checkpointing and with --lora-rank 64
Each section is independent: one that fails (out of memory, a kernel missing, `compiled` on a
CPU) prints its error in its row and the suite goes on. --tiny runs the same sections on the
toy shapes in well under a minute (tests/test_bench.py), so the suite cannot rot while no GPU
is lent. The table is printed and written to OUT/gpu_suite.json with the device's name.
"""
import dataclasses
import json
import os
import platform
import resource
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "recipes", "models")
SIZES = {  # what each section runs at
    "full": dict(model="Qwen--Qwen3-0.6B", vlm="Qwen--Qwen3-VL-2B-Thinking", rows=128, new=256,
                 prompts=16, group=8, vlm_prompts=8, image=448, lora=64, copy_mb=1024),
    "tiny": dict(model=None, vlm=None, rows=8, new=16, prompts=2, group=2, vlm_prompts=2,
                 image=96, lora=4, copy_mb=64),
}


EXTRAS = {"PIL": "vision", "peft": "lora"}  # a module -> the extra that installs it


@dataclasses.dataclass
class Suite:
    device: torch.device
    size: dict
    rows: list = dataclasses.field(default_factory=list)

    def section(self, name: str, fn, needs: str = ""):
        """Run one section; its rows, or one row with its error. Peak memory is the section's.
        A section whose optional extra (`needs`, a module) is not installed is skipped, with
        one line naming it; the others run."""
        import importlib.util
        if needs and importlib.util.find_spec(needs) is None:
            print(f"gpu suite: {name} skipped: it needs {needs} (pip install -e "
                  f"'.[{EXTRAS.get(needs, needs)}]')", flush=True)
            self.rows.append({"section": name, "error": f"skipped: {needs} is not installed"})
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            for row in fn():
                self.rows.append({"section": name, **row, "peak_gb": peak_gb(self.device)})
        except (Exception, SystemExit) as e:  # out of memory, a missing kernel: go on
            self.rows.append({"section": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"gpu suite: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)


def peak_gb(device: torch.device) -> float:
    """The section's peak allocated memory (CUDA), or the process's peak RSS (CPU: monotone
    over the whole run, so only an upper bound for a later section)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * n / (time.perf_counter() - t0)


def text_model(suite: Suite):
    """(model on the device in float32, tokenizer): Qwen3-0.6B's shape, or the toy's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.toy.models import build_toy_model, build_toy_tokenizer
    tok = build_toy_tokenizer()
    torch.manual_seed(0)
    if suite.size["model"] is None:
        return build_toy_model(tok).to(suite.device), tok
    config = AutoConfig.from_pretrained(os.path.join(MODELS, suite.size["model"]), trust_remote_code=False)
    with suite.device:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok


def prompts(tok, n: int, device):
    from engine.rollout import left_pad
    from engine.toy import arithmetic
    ids = [tok.apply_chat_template([{"role": "user", "content": "Q" + e.prompt}],
                                   add_generation_prompt=True, tokenize=False)
           for e in arithmetic.make_toy("train", n)]
    ids, mask = left_pad([tok(t, add_special_tokens=False)["input_ids"] for t in ids],
                         tok.pad_token_id)
    return ids.to(device), mask.to(device)


def rollout(suite: Suite, bw: float):
    from engine.rollout import generate
    model, tok = text_model(suite)
    n, rows = suite.size["new"], suite.size["rows"]
    ids, mask = prompts(tok, rows, suite.device)
    c = model.config.get_text_config()
    weights = 2 * sum(p.numel() for p in model.parameters())  # bf16, tied head counted once
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * rows
    floor_ms = (weights + kv * (ids.shape[1] + n / 2)) / bw * 1e3
    autocast = torch.autocast(suite.device.type, dtype=torch.bfloat16)
    model.eval()
    for mode, cast in (("dynamic", autocast), ("static", autocast), ("compiled", autocast),
                       ("dynamic, bf16 weights", None)):
        try:
            if cast is None:
                model = model.to(torch.bfloat16)
            times = []
            with torch.no_grad(), (cast or torch.autocast(suite.device.type, enabled=False)):
                # each shape once to warm up (compile, allocate), then timed: n new tokens, and
                # 1 (the prefill), whose difference is n - 1 decode steps
                for new in (n, 1, n, 1):
                    sync(suite.device)
                    t0 = time.perf_counter()
                    generate(model, ids, mask, max_new_tokens=new, temperature=1.0, eos_id=-1,
                             pad_id=tok.pad_token_id, mode=mode.split(",")[0],
                             generator=torch.Generator(suite.device).manual_seed(0))
                    sync(suite.device)
                    times.append(time.perf_counter() - t0)
            step_ms = (times[2] - times[3]) / (n - 1) * 1e3
            yield dict(what=f"rollout {mode}", tokens_s=rows * n / times[2], ms_per_step=step_ms,
                       floor_ms=floor_ms, x_floor=step_ms / floor_ms)
        except Exception as e:  # `compiled` needs CUDA: one row, the others go on
            yield dict(what=f"rollout {mode}", error=f"{type(e).__name__}: {str(e)[:160]}")


def forward(suite: Suite):
    """No-grad teacher-forced forward of prompt + response, the LM head a chunk at a time."""
    from engine.teachers import column_chunks, lm_head_logits, response_hidden
    model, tok = text_model(suite)
    n, rows = suite.size["new"], suite.size["rows"]
    ids, mask = prompts(tok, rows, suite.device)
    resp = torch.randint(3, len(tok), (rows, n), device=suite.device)
    ones = torch.ones_like(resp)
    with torch.no_grad(), torch.autocast(suite.device.type, dtype=torch.bfloat16):
        for timed in (False, True):
            sync(suite.device)
            t0 = time.perf_counter()
            h = response_hidden(model, ids, mask, resp, ones)
            for t0_, t1 in column_chunks(rows, n, model, 0):
                lm_head_logits(model, h[:, t0_:t1])
            sync(suite.device)
    yield dict(what="teacher-forced forward", tokens_s=rows * n / (time.perf_counter() - t0))


def steps(suite: Suite, algo: str, *, vlm: bool = False, repeat: int = 2, **options):
    """Steps of train.train_step at the suite's shape: (step seconds, peak) of each."""
    import train
    from engine import config
    from engine.distributed import Dist, Stopwatch, autocast
    size = suite.size
    given = dict(algo=algo, model="toy", prompts_per_step=size["vlm_prompts" if vlm else "prompts"],
                 group_size=size["group"], max_new_tokens=size["new"], ignore_eos=True,
                 eval_data="", dtype="bfloat16", out=tempfile.mkdtemp(prefix="gpu-suite-"),
                 **options)
    if algo in config.USED_BY["kl_coef"]:
        given["kl_coef"] = 0.0  # no reference copy: GRPO and RLSD differ by the teacher alone
    cfg = config.resolve_config(given)
    dist = Dist(device=suite.device)
    model, tok, examples = vlm_model(suite) if vlm else (*text_model(suite), None)
    if examples is None:
        from engine.toy import arithmetic
        examples = arithmetic.make_toy("train", 1000)
    if cfg.gradient_checkpointing:
        from engine.rollout import checkpoint_layers
        checkpoint_layers(model)
    if cfg.lora_rank:
        from engine.lora import add_lora
        model = add_lora(model, rank=cfg.lora_rank, alpha=2 * cfg.lora_rank, dropout=0.0,
                         targets=cfg.lora_targets)
    teacher, ref = train.teachers_for(cfg, model, tok, dist)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    gen = torch.Generator(device=suite.device).manual_seed(0)
    for step in range(1, repeat + 1):
        sync(suite.device)
        t0 = time.perf_counter()
        with autocast(cfg.dtype, dist):
            train.train_step(model, opt, tok=tok, teacher=teacher, ref=ref, examples=examples,
                             step=step, cfg=cfg, dist=dist, gen=gen, sw=Stopwatch(suite.device))
        sync(suite.device)
        yield dict(what=f"{algo} step {step}" + "".join(f", {k}" for k in options),
                   step_s=time.perf_counter() - t0)


def vlm_model(suite: Suite):
    """(Qwen3-VL-2B-shaped model or the toy VLM, its tokenizer, examples with pictures)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from engine.toy import models, shapes
    side = suite.size["image"]
    tok = models.toy_vlm_tokenizer(max_pixels=side * side)
    if suite.size["vlm"] is None:
        model = models.toy_vlm(seed=0)[0].to(suite.device)
    else:  # the published shape; its special tokens renumbered to the toy tokenizer's
        config = AutoConfig.from_pretrained(os.path.join(MODELS, suite.size["vlm"]), trust_remote_code=False)
        for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                           ("vision_start_token_id", "<|vision_start|>"),
                           ("vision_end_token_id", "<|vision_end|>")):
            setattr(config, key, tok.convert_tokens_to_ids(token))
        torch.manual_seed(0)
        with suite.device:
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    examples = shapes.make_shapes("train", 64)
    if side != 96:  # the pictures enlarged to the section's size (448 x 448: 196 image tokens)
        examples = [dataclasses.replace(e, images=[_enlarged(e.images[0], side)])
                    for e in examples]
    return model, tok, examples


def _enlarged(png: bytes, side: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).resize((side, side)).save(buf, format="PNG")
    return buf.getvalue()


def run(device: str, tiny: bool, out: str) -> list:
    suite = Suite(torch.device(device), SIZES["tiny" if tiny else "full"])
    bw = {}

    def measure_bandwidth():
        bw["bytes_s"] = bandwidth(suite.device, suite.size["copy_mb"])
        yield dict(what="memory bandwidth (copy)", gb_s=bw["bytes_s"] / 1e9)

    suite.section("bandwidth", measure_bandwidth)
    suite.section("rollout", lambda: rollout(suite, bw.get("bytes_s", float("nan"))))
    suite.section("forward", lambda: forward(suite))
    for algo in ("rlsd", "grpo"):
        suite.section(f"{algo} step", lambda a=algo: steps(suite, a))
    suite.section("vlm", lambda: steps(suite, "rlsd", vlm=True), needs="PIL")
    suite.section("memory", lambda: steps(suite, "rlsd", gradient_checkpointing=True))
    suite.section("memory", lambda: steps(suite, "rlsd", lora_rank=suite.size["lora"]),
                  needs="peft")
    name = torch.cuda.get_device_name(suite.device) if suite.device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    report = dict(device=name, torch=torch.__version__, tiny=tiny, rows=suite.rows,
                  date=time.strftime("%Y-%m-%d"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_suite.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))
    return suite.rows


def table(report: dict) -> str:
    """The suite's rows as one markdown table, the device named above it."""
    cols = ("tokens_s", "ms_per_step", "floor_ms", "x_floor", "step_s", "gb_s", "peak_gb")
    lines = [f"{report['device']}, torch {report['torch']}, {report['date']}"
             + (" (tiny shapes)" if report["tiny"] else ""), "",
             "| section | what | tokens/s | ms / decode step | floor ms | x floor | step s "
             "| GB/s | peak GB | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else "" for c in cols]
        lines.append(f"| {r['section']} | {r.get('what', '')} | " + " | ".join(cells)
                     + f" | {r.get('error', '')} |")
    return "\n".join(lines)
