"""Benchmark one training step: where the time goes, tokens per second, peak memory.

    python tools/bench.py                                  # GRPO and RLSD on the toy model, and the ratio
    python tools/bench.py --algos rlsd --group-size 16 --max-new-tokens 256
    python tools/bench.py --scaling                        # step time vs group size, length, model size
    python tools/bench.py --vs-trl --prompts-per-step 8    # against TRL's GRPOTrainer at qwen3-3m
    python tools/bench.py --vs-trl-sizes toy,qwen3-3m,qwen3-30m --prompts-per-step 8 --algos grpo

Each configuration runs in a fresh process (so peak memory is its own): `--warmup` steps,
then the median over `--steps` steps of the phases the trainer reports in metrics.jsonl:
    rollout    sampling G responses per prompt with the KV cache, rewards, teacher prompts
    teacher    no-grad scoring by the privileged teacher / KL reference
    fwd_bwd    student forward, loss, backward
    optimizer  gradient clipping, AdamW, teacher update
Responses always run to --max-new-tokens (`ignore_eos`), so lengths are what was asked for.
"Forward tok/s" is a no-grad teacher-forced forward over the same prompt + response tokens:
how close sampling gets to the model's own throughput. The model is the toy Qwen3 with random
weights (no warm start needed) unless --model names another, or --shape builds a real model's
architecture from its config with random weights (no download):

    python tools/bench.py --shape qwen3-0.6b --dtype bfloat16 --generation compiled   # on a GPU
    python tools/bench.py --gpu-suite          # every GPU measurement at once (tools/gpu_suite.py)
"""
import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from engine.progress import Progress
from engine.rollout import GENERATION_MODES

PHASES = ("rollout", "teacher", "fwd_bwd", "optimizer")
# Qwen3 config fields, built with random weights. qwen3-0.6b is the real checkpoint's
# config.json (the toy tokenizer writes the prompts; the model keeps its full vocabulary and LM
# head); qwen3-3m and qwen3-30m are toy-vocabulary models between the 0.3M toy and a real one,
# where CPU step times stop being dominated by fixed overheads.
SHAPES = {"qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                             num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                             head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                             rms_norm_eps=1e-6, tie_word_embeddings=True),
          "qwen3-3m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64),
          "qwen3-30m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64)}


def build_model(args, tok):
    """The benchmarked model with random weights: the toy, a --shape, or the --vocab one."""
    from engine.toy.models import build_toy_model
    if args.vocab:  # the wide-vocabulary memory configuration: tiny model, huge LM head
        return build_toy_model(tok, vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=2 * args.hidden, head_dim=args.hidden // 4,
                               num_hidden_layers=2, max_position_embeddings=2048)
    return build_toy_model(tok, **SHAPES.get(args.shape, {}))


def measure(args) -> dict:
    """Run warm-up + timed steps of one configuration in this process; return medians."""
    from engine import config
    from engine.toy import arithmetic
    from engine import rollout
    import train
    from engine.toy import warmstart
    from engine.distributed import Dist, Stopwatch, autocast, gathered, release_large_blocks
    from engine.toy.models import build_toy_tokenizer
    from engine.teachers import column_chunks, lm_head_logits, response_hidden

    rollout.SHARE_PROMPTS = bool(args.share_prompts)

    given = dict(algo=args.algo, model="toy" if args.model == "toy-init" else args.model,
                 prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                 max_new_tokens=args.max_new_tokens, ignore_eos=True, eval_data="",
                 out=tempfile.mkdtemp(prefix="bench-"), seed=0, dtype=args.dtype,
                 generation=args.generation,
                 micro_batch_size=args.micro_batch_size)
    if args.algo in config.USED_BY["kl_coef"]:
        given["kl_coef"] = args.kl_coef
    cfg = config.resolve_config(given)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = Dist(device=device)
    torch.manual_seed(0)
    if args.vocab or args.shape or args.model == "toy-init":
        tok = build_toy_tokenizer()
        model = build_model(args, tok).to(device)
    else:
        model, tok = warmstart.load_policy(cfg, dist, args.model)
    release_large_blocks(model, device)  # as train.py does
    teacher, ref = train.teachers_for(cfg, model, tok, dist)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(0)
    examples = arithmetic.make_toy("train", 2000)
    rows = []
    for step in range(1, args.warmup + args.steps + 1):
        sw = Stopwatch(device)
        t0 = time.perf_counter()
        with autocast(cfg.dtype, dist):  # as train.train does
            _, b = train.train_step(model, opt, tok=tok, teacher=teacher, ref=ref,
                                    examples=examples, step=step, cfg=cfg, dist=dist, gen=gen,
                                    sw=sw)
        step_s = time.perf_counter() - t0
        ro = b
        fw = Stopwatch(device)
        with torch.no_grad(), gathered(model), autocast(cfg.dtype, dist), fw("forward"):
            h = response_hidden(model, ro.prompt_ids, ro.prompt_mask, ro.resp_ids, ro.resp_mask)
            for t0, t1 in column_chunks(len(b.examples), ro.resp_ids.shape[1], model,
                                              cfg.logit_chunk):  # the same chunked LM head
                lm_head_logits(model, h[:, t0:t1])
        fwd_s = fw.times["forward"]
        gen_tokens = ro.resp_mask.sum().item()
        trained = b.mask.sum().item()
        rows.append(dict(step_s=step_s, **{p: sw.times.get(p, 0.0) for p in PHASES},
                         rollout_tok_s=gen_tokens / sw.times["rollout"],
                         forward_tok_s=gen_tokens / fwd_s,
                         trained_tok_s=trained / (sw.times["fwd_bwd"] + sw.times["optimizer"]
                                                  + sw.times.get("teacher", 0.0))))
    timed = rows[args.warmup:]
    out = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is KiB on Linux: the whole process, Python and libraries included
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # what one (rows, T, V) float32 logits tensor of a micro-batch would take, had it existed
    out["full_logits_gb"] = (len(b.examples) * args.max_new_tokens
                             * model.get_output_embeddings().weight.shape[0] * 4 / 2**30)
    out.update(algo=args.algo, G=args.group_size, L=args.max_new_tokens,
               P=args.prompts_per_step, threads=torch.get_num_threads(),
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    return out


def ops_per_chunk(algo: str) -> float:
    """Tensor ops (aten calls: kernel launches on a GPU) that one LM-head chunk adds to a
    training step, forward + recompute + backward: a step with 16 chunks minus one with 8."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine import config
    from engine.toy import arithmetic
    import train
    from engine.distributed import Dist, Stopwatch
    from engine.toy.models import build_toy_model, build_toy_tokenizer

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for chunk in (1, 2):  # 16 and 8 chunks of a 16-token response; the rollouts are identical
        cfg = config.resolve_config(dict(algo=algo, model="toy", prompts_per_step=4, group_size=2,
                                        max_new_tokens=16, ignore_eos=True, eval_data="",
                                        out=tempfile.mkdtemp(prefix="bench-"), logit_chunk=chunk,
                                        **({"kl_coef": 0.0} if algo in config.USED_BY["kl_coef"]
                                           else {})))
        dist = Dist(device=torch.device("cpu"))
        tok = build_toy_tokenizer()
        model = build_toy_model(tok)
        teacher, ref = train.teachers_for(cfg, model, tok, dist)
        opt = torch.optim.AdamW(model.parameters())
        with Count() as counter:
            train.train_step(model, opt, tok=tok, teacher=teacher, ref=ref,
                             examples=arithmetic.make_toy("train", 100), step=1, cfg=cfg, dist=dist,
                             gen=torch.Generator().manual_seed(0), sw=Stopwatch(dist.device))
        counts.append(counter.n)
    return (counts[0] - counts[1]) / 8


def measure_trl(args) -> dict:
    """The same configuration through TRL's GRPOTrainer (installed for the benchmark only).

    Same random toy weights saved as a HF directory, same prompts rendered through the same
    chat template, P x G completions of exactly L tokens (min_new_tokens), temperature 1,
    one optimizer step per generation batch, no KL (beta 0), DAPO clip 0.2 / 0.28 and
    token-level loss: GRPO as this project's bench runs it."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("--vs-trl needs TRL: pip install trl (a benchmark-only dependency)") from None
    import data
    from engine.prompts import TOY_TEMPLATES, render
    from engine.toy import arithmetic
    from engine.toy.models import build_toy_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    tok = build_toy_tokenizer()
    build_model(args, tok).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_prompts = args.prompts_per_step * (args.warmup + args.steps)
    exs = arithmetic.make_toy("train", n_prompts)
    chat = lambda e: tok.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": render(TOY_TEMPLATES["student"], e)}],
        add_generation_prompt=True, tokenize=False)
    ds = Dataset.from_list([{"prompt": chat(e), "answer": e.answer} for e in exs])

    def accuracy(completions, answer, **_):
        return [data.reward(c, a) for c, a in zip(completions, answer)]

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(
        output_dir=tmp, per_device_train_batch_size=args.prompts_per_step * args.group_size,
        gradient_accumulation_steps=1, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens}, learning_rate=2e-4,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", max_steps=args.warmup + args.steps,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
        seed=0, shuffle_dataset=False, disable_dropout=True,
        # TRL 1.x defaults to bf16 autocast and gradient checkpointing; ours runs --dtype with
        # no checkpointing (train.py's defaults), so TRL is set the same way. With its defaults
        # on a CPU without bf16 matrix units TRL's step is ~14x slower (measured at qwen3-3m)
        bf16=args.dtype == "bfloat16", gradient_checkpointing=False)
    trainer = GRPOTrainer(model=tmp, reward_funcs=accuracy, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    out = {"step_s": statistics.median(times[args.warmup:]), "algo": "trl-grpo",
           "G": args.group_size, "L": args.max_new_tokens, "P": args.prompts_per_step,
           "device": "cuda" if torch.cuda.is_available() else "cpu",
           "threads": torch.get_num_threads()}
    out["peak_mem_gb"] = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out


def run_isolated(args, **override) -> dict:
    """One configuration in a fresh Python process; its JSON result."""
    argv = [sys.executable, os.path.abspath(__file__), "--one"]
    for k, v in {**vars(args), **override}.items():
        if k in ("one", "scaling", "algos", "vs_trl", "vs_trl_sizes", "trl", "ops_per_chunk",
                 "gpu_suite", "device", "tiny", "out") or v is None:
            continue
        argv += [f"--{k.replace('_', '-')}", str(v)]
    if override.get("trl"):
        argv.append("--trl")
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"benchmark run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results, with_model: bool = False) -> str:
    head = ("| algo | G | L | step s | rollout s | teacher s | fwd+bwd s | optim s | rollout tok/s "
            "| forward tok/s | trained tok/s | peak GB | one full fp32 logits GB |")
    if with_model:
        head = "| model M |" + head[1:]
    lines = [head, "|" + "---|" * (13 + with_model)]
    for r in results:
        model = f"| {r['params_m']:.1f} " if with_model else ""
        lines.append(f"{model}| {r['algo']} | {r['G']} | {r['L']} | {r['step_s']:.3f} | {r['rollout']:.3f} "
                     f"| {r['teacher']:.3f} | {r['fwd_bwd']:.3f} | {r['optimizer']:.3f} "
                     f"| {r['rollout_tok_s']:.0f} | {r['forward_tok_s']:.0f} "
                     f"| {r['trained_tok_s']:.0f} | {r['peak_mem_gb']:.2f} "
                     f"| {r['full_logits_gb']:.2f} |")
    return "\n".join(lines)


def trl_table(rows) -> str:
    """(size, ours, TRL's) per model size: one line each, the ratio last."""
    lines = ["| model | parameters M | ours: step s (rollout / fwd+bwd) | TRL step s | ours / TRL |",
             "|---|---|---|---|---|"]
    for size, ours, trl in rows:
        lines.append(f"| {size} | {ours['params_m']:.1f} | {ours['step_s']:.2f} "
                     f"({ours['rollout']:.2f} / {ours['fwd_bwd']:.2f}) | {trl['step_s']:.2f} "
                     f"| {ours['step_s'] / trl['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training steps.")
    p.add_argument("--algos", default="grpo,rlsd", help="comma-separated algorithms")
    p.add_argument("--algo", default="grpo", help=argparse.SUPPRESS)
    p.add_argument("--model", default="toy-init", help="'toy-init' (random toy Qwen3), 'toy' or a path")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="rows per forward/backward (0: the whole batch at once)")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="0 (default): no reference model, so GRPO vs RLSD differs by the teacher alone")
    p.add_argument("--vocab", type=int, default=0,
                   help="memory benchmark: a 2-layer toy Qwen3 with this vocabulary (e.g. 151936)")
    p.add_argument("--hidden", type=int, default=32, help="its hidden size (with --vocab)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a real architecture from its config, random weights (no download)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: autocast compute over float32 master weights, as train.py")
    p.add_argument("--generation", default="dynamic", choices=GENERATION_MODES,
                   help="rollout KV cache (rollout.generate); 'compiled' needs CUDA")
    p.add_argument("--share-prompts", type=int, default=1, choices=(0, 1),
                   help="0: every row's prompt runs through the model again (rollout.SHARE_PROMPTS)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--scaling", action="store_true", help="group size 4/8/16, length 64/128/256, model toy/qwen3-3m/qwen3-30m")
    p.add_argument("--vs-trl", action="store_true",
                   help="also run TRL's GRPOTrainer on the same configuration and print the ratio")
    p.add_argument("--vs-trl-sizes", default="",
                   help="with --vs-trl: comma-separated sizes, e.g. toy,qwen3-3m,qwen3-30m "
                        "(default: --shape, else qwen3-3m)")
    p.add_argument("--ops-per-chunk", action="store_true",
                   help="count the tensor ops one LM-head chunk costs, per algorithm in --algos")
    p.add_argument("--gpu-suite", action="store_true",
                   help="every GPU measurement in one run (tools/gpu_suite.py): rollout against "
                        "the bandwidth floor, forward, RLSD and GRPO steps, a VLM, memory options")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="with --gpu-suite: the device (default: cuda if present)")
    p.add_argument("--tiny", action="store_true",
                   help="with --gpu-suite: the toy shapes, every section in well under a minute")
    p.add_argument("--out", default="runs/gpu-suite", help="with --gpu-suite: where "
                   "gpu_suite.json goes")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trl", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.gpu_suite:
        # its neighbour in tools/, run as a script (python tools/bench.py) or imported (tests)
        gpu_suite = importlib.import_module(f"{__package__}.gpu_suite" if __package__
                                            else "gpu_suite")
        gpu_suite.run(a.device, a.tiny, a.out)
        return
    if a.one:
        print(json.dumps(measure_trl(a) if a.trl else measure(a)))
        return
    algos = a.algos.split(",")
    # against TRL at the performance goal's size unless told otherwise (the toy's 0.3M is all
    # fixed overheads); --vs-trl-sizes compares at several sizes in one table
    sizes = a.vs_trl_sizes.split(",") if a.vs_trl_sizes else [a.shape or "qwen3-3m"]
    for size in sizes:
        if size != "toy" and size not in SHAPES:
            raise SystemExit(f"--vs-trl-sizes: unknown size {size!r} (toy, {', '.join(SHAPES)})")
    if a.vs_trl_sizes:
        a.vs_trl = True
    if a.vs_trl and a.shape is None and not a.vocab and a.model == "toy-init":
        a.shape = sizes[0] if sizes[0] != "toy" else None
    if a.ops_per_chunk:
        for x in algos:
            print(f"{x}: {ops_per_chunk(x):.0f} tensor ops per LM-head chunk (forward, recompute, backward)")
        return
    prog = Progress("bench: configurations measured", len(algos))
    results = []
    for i, x in enumerate(algos):  # minutes each on CPU: say how far along
        prog.update(i)
        results.append(run_isolated(a, algo=x))
    prog.update(len(algos))
    prog.close()
    print(table(results))
    by = {r["algo"]: r for r in results}
    if "grpo" in by and "rlsd" in by:
        print(f"\nRLSD / GRPO step time: {by['rlsd']['step_s'] / by['grpo']['step_s']:.2f} "
              f"(goal <= 1.3; RLSD adds one no-grad teacher forward)")
    if a.vs_trl:
        rows = []
        for size in sizes:
            shape = None if size == "toy" else size  # run_isolated passes no --shape: the toy
            ours = (by["grpo"] if "grpo" in by and shape == a.shape
                    else run_isolated(a, algo="grpo", shape=shape))
            rows.append((size, ours, run_isolated(a, algo="grpo", trl=True, shape=shape)))
        print("\nAgainst TRL's GRPOTrainer (goal: ours / TRL <= 0.5 at qwen3-3m):\n"
              + trl_table(rows))
    if a.scaling:
        grid = ([dict(group_size=g) for g in (4, 8, 16)]
                + [dict(max_new_tokens=n) for n in (128, 256)]
                + [dict(shape=s) for s in (None, "qwen3-3m", "qwen3-30m") if s != a.shape])
        prog, rows = Progress("bench: scaling configurations", len(grid)), []
        for i, change in enumerate(grid):
            prog.update(i)
            rows.append(run_isolated(a, algo=algos[0], **{"group_size": a.group_size,
                                                          "max_new_tokens": 64, **change}))
        prog.close()
        print("\nScaling (" + algos[0] + "; G, L and the model one at a time):\n"
              + table(rows, with_model=True))
    r0 = results[0]
    print(f"\n{r0['device']}, {r0['threads']} threads, {r0['params_m']:.1f}M parameters, "
          f"{a.dtype}, {a.generation} KV cache, median of {a.steps} steps after {a.warmup} "
          f"warm-up, P={a.prompts_per_step} prompts/step")


if __name__ == "__main__":
    main()
