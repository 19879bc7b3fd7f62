"""Evaluate checkpoints: accuracy (greedy pass@1, avg@k, pass@k), leakage, entropy, length.

    python eval.py runs/rlsd/checkpoint-000150                 # as its run evaluated it
    python eval.py CKPT --data test.jsonl --k 8 --temperature 1.0
    python eval.py --compare runs/grpo runs/rlsd --plot cmp.png  # table (and plots) of runs

A checkpoint is evaluated the way its run was trained: the prompt template, system prompt,
chat-template options, columns, reward and response length come from the run's config.json
(train.py writes it next to the checkpoints), each overridable by train.py's flag of the same
name; a plain model directory or hub id gets the defaults, and a line says which.

Leakage is the fraction of responses that mention material only the privileged teacher saw
("reference solution", "the hint", ...): the signal the RLSD paper uses to show OPSD's
student learning to talk as if it had been given the answer.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from functools import partial

import torch

import data
from engine.toy import chains, clips, tasks
from engine import mer, rewards, vision
import grpo
from engine.distributed import gathered
from engine.progress import Progress
from engine.prompts import LEAK_PHRASES, TOY_LEAK_MARKERS, prompts_for
from engine.rundir import read_jsonl
from engine.rollout import generate, left_pad, load_model, stop_ids
from engine.teachers import response_logits

BATCH = 256  # prompts per generation call


def _shard(items, dist):
    return items[dist.rank::dist.world] if dist is not None else items


def _sum(dist, x):
    return dist.sum(x).item() if dist is not None else float(x)


@torch.no_grad()
def sample(model, tok, examples, encode, *, max_new_tokens, temperature=0.0, k=1,
           generator=None, device="cpu", progress: Progress | None = None, media_of=None):
    """k responses per example (temperature 0: greedy); `encode(example)` gives the prompt
    ids, `media_of(example)` its processed media (Prompts.media; default: vision.row_media).
    Returns (texts, rollouts per batch)."""
    media_of = media_of or (lambda e: vision.row_media(tok, e))
    texts, stats = [], []
    rows = [e for e in examples for _ in range(k)]
    for i in range(0, len(rows), BATCH):
        if progress is not None:
            progress.update(i)
        chunk = rows[i:i + BATCH]
        ids, mask = left_pad([encode(e) for e in chunk], tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        # a multimodal row's media in the prefill ({} for text), as batch.sample does
        media = [media_of(e) for e in chunk]
        extra = vision.forward_inputs(model, media, ids, mask)
        ro = generate(model, ids, mask, max_new_tokens=max_new_tokens,
                      temperature=temperature, eos_id=stop_ids(model, tok),
                      pad_id=tok.pad_token_id, generator=generator,
                      prefill_positions=extra.pop("position_ids", None), prefill_inputs=extra,
                      banned_ids=vision.placeholder_ids(tok) if extra else None)
        texts += tok.batch_decode(torch.where(ro.resp_mask.bool(), ro.resp_ids, tok.pad_token_id),
                                  skip_special_tokens=True)
        stats.append(dataclasses.replace(ro, media=media))  # for response_entropy
    if progress is not None:
        progress.close()
    return texts, stats


def accuracy(model, tok, examples, encode, cfg, dist=None, leak_phrases=None, leaked=None):
    """Greedy pass@1 over `examples`, sharded over ranks and all-reduced; with
    `leak_phrases` (or a test `leaked(text) -> bool`), (pass@1, leakage of the same greedy
    responses)."""
    mine = _shard(examples, dist)
    device = dist.device if dist is not None else "cpu"
    # a line on a terminal only: training logs stay one line per step
    quiet = (dist is not None and dist.rank != 0) or not sys.stderr.isatty()
    texts, _ = sample(model, tok, mine, encode, max_new_tokens=cfg.max_new_tokens,
                      device=device, progress=Progress("evaluating", len(mine), quiet=quiet),
                      media_of=partial(prompts_for(cfg).media, tok)) if mine else ([], [])
    correct = sum(rewards.accuracy(cfg.reward, texts, mine))
    acc = _sum(dist, correct) / max(_sum(dist, len(mine)), 1.0)
    if leak_phrases is None and leaked is None:
        return acc
    n_leaked = (sum(map(leaked, texts)) if leaked is not None
                else leakage(texts, leak_phrases) * len(texts))
    return acc, _sum(dist, n_leaked) / max(_sum(dist, len(mine)), 1.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, Eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def leakage(texts, phrases) -> float:
    """Fraction of responses that contain any privileged phrase (case-insensitive)."""
    phrases = [p.lower() for p in phrases]
    return sum(any(p in t.lower() for p in phrases) for t in texts) / max(len(texts), 1)


@torch.no_grad()
def response_entropy(model, ro, temperature=1.0) -> float:
    """Mean per-token entropy of the model on its own responses."""
    z = response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.resp_ids, ro.resp_mask,
                        **vision.forward_inputs(model, ro.media, ro.prompt_ids,
                                                ro.prompt_mask, ro.resp_ids, ro.resp_mask))
    h = grpo.entropy(z, temperature=temperature)
    m = ro.resp_mask.bool()
    return (h[m].sum() / m.sum().clamp(min=1)).item()


def evaluate_checkpoint(path, examples, *, prompts, max_new_tokens, k, temperature, phrases,
                        seed=0, reward="verifier", leaked=None, scores=None) -> dict:
    model, tok = load_model(path)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    encode, media_of = partial(prompts.student, tok), partial(prompts.media, tok)
    greedy, g_ro = sample(model, tok, examples, encode, max_new_tokens=max_new_tokens,
                          progress=Progress(f"{path}: greedy", len(examples)),
                          media_of=media_of)
    res = {"n": len(examples),
           "pass@1_greedy": sum(rewards.accuracy(reward, greedy, examples)) / len(examples),
           **(scores(greedy, examples) if scores else {})}  # a benchmark's own metrics
    texts, ro = greedy, g_ro
    if k > 1 or temperature > 0:
        texts, ro = sample(model, tok, examples, encode, max_new_tokens=max_new_tokens,
                           temperature=temperature or 1.0, k=k, generator=gen,
                           progress=Progress(f"{path}: {k} samples each", k * len(examples)),
                           media_of=media_of)
        acc = rewards.accuracy(reward, texts, [e for e in examples for _ in range(k)])
        correct = [sum(acc[i * k:(i + 1) * k]) for i in range(len(examples))]
        res[f"avg@{k}"] = sum(correct) / (k * len(examples))
        res[f"pass@{k}"] = sum(pass_at_k(k, c, k) for c in correct) / len(examples)
    res["leakage"] = (sum(map(leaked, texts)) / max(len(texts), 1) if leaked is not None
                      else leakage(texts, phrases))  # the chains task's own leak test
    n_tok = sum(r.resp_mask.sum().item() for r in ro)
    res["response_len_mean"] = n_tok / len(texts)
    res["entropy"] = sum(response_entropy(model, r) * r.resp_mask.sum().item() for r in ro) / max(n_tok, 1)
    return res


def eval_sets(cfg, columns) -> dict:
    """The trainer's evaluation sets: an embedded task's test + ood splits, or the --eval-data
    file."""
    if not cfg.eval_data:
        return {}
    if cfg.eval_data in data.TASKS:
        return {s: tasks.make_task(cfg.eval_data, s, cfg.eval_n) for s in ("test", "ood")}
    return {"eval": tasks.load_data(cfg.eval_data, "eval", n_toy=0, columns=columns,
                                    fps=cfg.video_fps, audio_in_video=cfg.use_audio_in_video)}


def eval_due(step: int, cfg) -> bool:
    """Is there an evaluation after `step`? Every --eval-every steps, at the --eval-at steps,
    and after the last one."""
    at = {int(s) for s in cfg.eval_at.split(",") if s.strip()}
    return step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0) or step in at


def evaluation_plan(sets: dict, cfg, start: int = 0) -> str:
    """One line: what the run will evaluate, when, and how many greedy generations that is."""
    if not sets:
        hint = "" if cfg.data in data.TASKS else " (--eval-data FILE evaluates on a file)"
        return f"evaluation: none{hint}"
    teacher = len(sets["test"]) if cfg.data in data.TASKS and "test" in sets else 0
    each = sum(len(x) for x in sets.values()) + teacher
    steps = [s for s in range(start + 1, cfg.steps + 1) if eval_due(s, cfg)]
    times = len(steps) + (start == 0)
    what = ", ".join(f"{name} {len(x)}" for name, x in sets.items())
    return (f"evaluation: {what}" + (f" and the answer-shown teacher on test {teacher}" if teacher
                                     else "")
            + f": {each} greedy generations of up to {cfg.max_new_tokens} tokens, "
            + ("before training, " if start == 0 else "")
            + (f"every {cfg.eval_every} steps and " if 0 < cfg.eval_every < cfg.steps else "")
            + (f"after steps {cfg.eval_at} and " if cfg.eval_at else "")
            + f"after the last step: {times * each} in all")


def evaluate(model, tok, sets: dict, cfg, dist) -> dict:
    """Greedy pass@1 on each set; on an embedded task also the answer-conditioned teacher's,
    and on the arithmetic one the leakage of the student's test responses (`leakage`).
    Greedy decoding consumes no random numbers, so evaluating never changes a run."""
    P = prompts_for(cfg)
    model.eval()
    out = {}
    with gathered(model):
        for name, exs in sets.items():
            if cfg.data == "clips":  # and per kind of question: the picture, the sound, both
                parts = {k: [e for e in exs if clips.kind_of(e) == k] for k in clips.KINDS}
                accs = {k: accuracy(model, tok, part, partial(P.student, tok), cfg, dist)
                        for k, part in parts.items() if part}
                out.update({f"{name}_acc_{k}": v for k, v in accs.items()})
                out[f"{name}_acc"] = sum(accs[k] * len(parts[k]) for k in accs) / len(exs)
            elif cfg.data == "chains":  # the task's own leak test (chains.leaked), every split
                out[f"{name}_acc"], out[f"{name}_leakage"] = accuracy(
                    model, tok, exs, partial(P.student, tok), cfg, dist, leaked=chains.leaked)
            elif cfg.data == "toy" and name == "test":  # does the student quote the context?
                # (arithmetic responses hold no letters; the markers are the context's labels)
                out["test_acc"], out["test_leakage"] = accuracy(
                    model, tok, exs, partial(P.student, tok), cfg, dist,
                    leak_phrases=LEAK_PHRASES + TOY_LEAK_MARKERS)
            else:
                out[f"{name}_acc"] = accuracy(model, tok, exs, partial(P.student, tok), cfg, dist)
            if cfg.data in data.TASKS and name == "test":  # does the self-teacher use the answer?
                teacher = partial(accuracy, model, tok, exs,
                                  lambda e: P.teacher(tok, e, "answer")[0], cfg, dist)
                if cfg.data == "chains":  # and cite it? (it was shown it: the metric's check)
                    out["test_teacher_acc"], out["test_teacher_leakage"] = teacher(
                        leaked=chains.leaked)
                else:
                    out["test_teacher_acc"] = teacher()
    return out


# ----------------------------------------------------------------------------------------
# Comparing runs
# ----------------------------------------------------------------------------------------

def read_metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl; a torn last line is dropped with a warning (rundir.read_jsonl),
    a bad line elsewhere is a DataError naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    try:
        return read_jsonl(path, warn=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        raise data.DataError(str(e)) from None


def compare_table(run_dirs, keys=("test_acc", "ood_acc", "reward_mean", "entropy",
                                  "response_len_mean", "step_time_s")) -> str:
    """Markdown table: per run, the first and last value of each metric."""
    lines = ["| run | steps | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for run in run_dirs:
        rows = read_metrics(run)
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            cells.append(f"{vals[0]:.3g} -> {vals[-1]:.3g}" if len(vals) > 1 else
                         (f"{vals[0]:.3g}" if vals else "-"))
        steps = max((r.get("step", 0) for r in rows), default=0)
        lines.append(f"| {os.path.basename(os.path.normpath(run))} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(run_dirs, out_png, keys=("reward_mean", "test_acc", "entropy", "response_len_mean")):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install -e '.[plot]'") from None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for run in run_dirs:
        rows = read_metrics(run)
        for ax, k in zip(axes, keys):
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), label=os.path.basename(os.path.normpath(run)))
    for ax, k in zip(axes, keys):
        ax.set_title(k)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


# What shapes a prompt and its verdict: read from the run's config.json next to the checkpoint,
# each overridable by the flag of the same name as train.py's
PROMPT_FIELDS = ("student_template", "system_prompt", "chat_template_kwargs", "reward",
                 "max_new_tokens", "prompt_key", "answer_key", "images_key", "videos_key",
                 "audios_key", "video_fps", "use_audio_in_video")


def run_config(checkpoint: str):
    """(Config of the run that wrote `checkpoint`, its path), from the config.json train.py
    writes into --out, the checkpoint's parent; (None, None) for a plain model or hub id. The
    file is data: each value must have its field's type (else one DataError naming it), and
    nothing it names is imported here (eval_config: its reward)."""
    from engine import config
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint.rstrip("/"))), "config.json")
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise data.DataError(f"{path}: not a readable JSON file ({str(e)[:80]})") from None
    if not isinstance(saved, dict) or "algo" not in saved:  # a model's own config.json
        return None, None
    values = {}
    for k, default in config.DEFAULTS.items():
        if k in saved:
            v, want = saved[k], type(default)
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise data.DataError(f"{path}: {k} = {saved[k]!r} should be {want.__name__}")
            values[k] = v
    return config.Config(**values), path


def eval_config(checkpoint: str, data_spec: str | None, overrides: dict):
    """(Config whose prompts, reward and lengths evaluate `checkpoint`, the evaluation data,
    a line saying where they came from). The run's own settings where its config.json is
    found, else the defaults (the embedded tasks' compact prompts, the papers' for a file)."""
    from engine import config
    from engine.checks import check_templates
    cfg, path = run_config(checkpoint)
    given = {k: v for k, v in overrides.items() if v is not None}
    if cfg is not None and cfg.reward not in rewards.REWARDS and "reward" not in given:
        # a run directory is data: the code its config.json names runs only when typed
        raise data.DataError(f"{path}: its run used the reward {cfg.reward!r}, a module:function "
                             f"that eval.py imports only when you type it: --reward "
                             f"{cfg.reward} (if you trust it), or another --reward")
    if cfg is not None:
        check_templates(dataclasses.replace(cfg, **given))  # shows the model no answer
    if cfg is None:
        spec = data_spec or "toy"
        cfg = config.Config(data=spec, student_template="", reward="verifier",
                            max_new_tokens={"toy": 40, "chains": 64, "shapes": 16,
                                            "clips": 12}.get(spec, 4096))
        note = (f"{checkpoint}: no run config.json beside it; the default prompts, reward and "
                f"length for --data {spec}")
    else:
        spec = data_spec or cfg.eval_data or (cfg.data if cfg.data in data.TASKS else "")
        if not spec:
            raise data.DataError(f"{checkpoint}: its run ({path}) evaluated on nothing; "
                                 f"give --data FILE")
        note = f"{checkpoint}: prompts, reward and length of its run ({path})"
    if given:
        note += "; overridden: " + ", ".join(f"--{k.replace('_', '-')}" for k in given)
    return dataclasses.replace(cfg, **given), spec, note


def parse_args(argv=None):
    from engine import config
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint the way its run was trained (its config.json: "
        "prompt template, system prompt, chat-template options, columns, reward, length), or "
        "compare runs.")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint directory (train.py's "
                   "--out/checkpoint-NNNNNN), any Hugging Face model directory, or a hub id")
    p.add_argument("--data", default=None, help="what to evaluate on: an embedded task (" +
                   ", ".join(data.TASKS) + ": its test + ood splits), a .jsonl / .json / "
                   ".csv / .parquet file, or mer-unibench:DIR[:SPLIT] (its metrics too; default: "
                   "the run's --eval-data, or its embedded task; 'toy' without a run)")
    p.add_argument("--n", type=int, default=500, help="problems per split of an embedded task")
    p.add_argument("--k", type=int, default=1, help="samples per problem for avg@k / pass@k")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the "
                   "k samples (0: 1.0 when --k > 1); pass@1_greedy is always greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of the k samples")
    p.add_argument("--leak-phrases", default="", help="comma-separated extra phrases that count "
                   "as leakage of privileged material")
    p.add_argument("--emotion-wheel", default="", help="with --data mer-unibench:DIR: a JSON "
                   "file of emotion word -> cluster, for the open-vocabulary set-level F_s")
    p.add_argument("--ablate", default="", choices=("", "audio", "video", "images"),
                   help="remove this medium from every row before evaluating (the modality "
                        "ablation: on --data clips, the accuracy of each kind of question)")
    p.add_argument("--out", default="", help="also write the results here, one JSON line per split")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="instead: a table of these "
                   "runs' first and last metrics (their metrics.jsonl)")
    p.add_argument("--plot", default="", help="with --compare: write a PNG of the curves")
    docs = config.field_help()
    for name in PROMPT_FIELDS:  # the same flags as train.py, defaulting to the run's values
        kind = type(config.DEFAULTS[name])
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{docs[name][1]} (default: the run's)")
    a = p.parse_args(argv)
    for name, ok, what in (("n", a.n >= 1, "at least 1"), ("k", a.k >= 1, "at least 1"),
                           ("temperature", math.isfinite(a.temperature) and a.temperature >= 0,
                            "a finite number >= 0")):
        if not ok:
            p.error(f"--{name} must be {what}, got {getattr(a, name)}")
    if not a.compare and not a.checkpoint:
        p.error("give a checkpoint, or --compare RUN_DIR...")
    return a


def evaluate_main(a) -> list[str]:
    """Evaluate `a.checkpoint` on each split; returns the JSON lines it printed."""
    from engine.checks import model_path_problem
    problem = model_path_problem(a.checkpoint)
    if problem:
        raise FileNotFoundError(f"{a.checkpoint}: {problem}")
    cfg, spec, note = eval_config(a.checkpoint, a.data, {k: getattr(a, k) for k in PROMPT_FIELDS})
    print(note + f"; reward: {cfg.reward}", file=sys.stderr)
    columns = {c: getattr(cfg, c + "_key") for c in data.COLUMNS}
    sets = ({s: tasks.make_task(spec, s, a.n) for s in ("test", "ood")} if spec in data.TASKS
            else {"eval": tasks.load_data(spec, "eval", n_toy=0, columns=columns,
                                          fps=cfg.video_fps, audio_in_video=cfg.use_audio_in_video,
                                          rationales=cfg.rationales if spec == cfg.data else "")})
    phrases = list(LEAK_PHRASES) + [p for p in a.leak_phrases.split(",") if p]
    if spec in ("toy", "shapes", "clips"):
        phrases += list(TOY_LEAK_MARKERS)
    leaked = chains.leaked if spec == "chains" else None
    wheel = mer.load_wheel(a.emotion_wheel) if a.emotion_wheel else None
    scores = partial(mer.metrics, wheel=wheel) if spec.startswith(mer.PREFIX) else None
    if a.ablate:  # each row without that medium (and without its placeholders in the prompt)
        sets = {n: [dataclasses.replace(e, **{a.ablate if a.ablate.endswith("s") else
                                              a.ablate + "s": []}) for e in exs]
                for n, exs in sets.items()}
    if spec == "clips":  # each kind of question on its own: the picture, the sound, both
        sets = {**sets, **{f"{n}/{k}": [e for e in exs if clips.kind_of(e) == k]
                           for n, exs in list(sets.items()) for k in clips.KINDS}}
    lines = []
    for name, exs in sets.items():
        res = evaluate_checkpoint(a.checkpoint, exs, prompts=prompts_for(cfg), k=a.k,
                                  temperature=a.temperature, phrases=phrases, leaked=leaked,
                                  scores=scores,
                                  reward=cfg.reward, max_new_tokens=cfg.max_new_tokens,
                                  seed=a.seed)
        lines.append(json.dumps({"split": name, **res}))
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.compare:
            print(compare_table(a.compare))
            if a.plot:
                plot_runs(a.compare, a.plot)
                print(f"wrote {a.plot}")
            return
        lines = evaluate_main(a)
        if a.out:
            with open(a.out + ".tmp", "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(a.out + ".tmp", a.out)
    except (data.DataError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
