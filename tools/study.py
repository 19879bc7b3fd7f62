"""The study: every method side by side on an embedded task, several seeds each.

    python tools/study.py                  # every arm x 3 seeds, then the report (~2 h, 2 CPU cores)
    python tools/study.py --jobs 1         # one process at a time (default: one per CPU core)
    python tools/study.py --report         # only the report, from the finished runs
    python tools/study.py --arms grpo,rlsd --seeds 0,1,2,3    # a subset, or more seeds
    python tools/study.py --check rlsd:0 --runs tools/results/runs   # rerun from the archive
    python tools/study.py --data shapes --arms grpo,ptdpo,ptdpo_exact,ptdpo_forward   # pictures

Every arm trains with `train.py` in its own process, on the same prompts (the data order is a
function of the seed and the step), the same number of prompts per step, group size,
response length and optimizer steps; otherwise each algorithm keeps the defaults `train.py`
gives it on the toy model (its paper's constants). Seed s uses the warm start of seed s
(trained once and cached); the warm starts are built first, side by side, then the runs go
`--jobs` at a time, one thread each (`child_env`). The study is resumable: a finished run is
reused, an interrupted one continues from its last checkpoint (`--resume`), so the study can be
stopped and started again at any time.

The report (`--report`, also at the end of a full run) reads the runs' metrics.jsonl and
writes tools/results/RESULTS.md (the table, the paired RLSD - GRPO comparison, each warm
start's accuracy), the plots tools/results/*.png (the forest plot of each arm's paired
difference to GRPO among them), and the same table into docs/study.md between its markers,
with the PTD-PO table of both tasks. Nothing in it is typed by hand. It also copies every
run's metrics, each seed's warm start and the environment to tools/results/runs/
(committed), so the report can be rebuilt and a run checked from the same weights without
rerunning the study.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import eval as evaluation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling claims.py
import claims  # noqa: E402

# arm -> (train.py flags, what it is). The two controls give the teacher the privileged
# context of a different, randomly chosen training problem (`--context-source other`).
ARMS = {
    "grpo": ([], "GRPO"),
    "dr_grpo": ([], "Dr. GRPO"),
    "dapo": ([], "DAPO (dynamic sampling, clip-higher, overlong shaping off at this length)"),
    "opd": (["--teacher", "toy"], "OPD, the stronger toy teacher (SFT on careful demonstrations)"),
    "opsd": ([], "OPSD, teacher shown the solution"),
    "sdpo": ([], "SDPO, teacher shown a successful sibling"),
    "srpo": ([], "SRPO: correct rows GRPO, failed rows SDPO-style"),
    "ptdpo": ([], "PTD-PO as released: its Top-K JSD term has zero gradient"),
    "ptdpo_exact": (["--algo", "ptdpo", "--ptd-divergence", "jsd-exact"],
                    "PTD-PO with the exact Top-K JSD (the paper's objective)"),
    "ptdpo_forward": (["--algo", "ptdpo", "--ptd-divergence", "forward"],
                      "PTD-PO with KL(teacher || student) on the same support"),
    "rlsd": ([], "RLSD, teacher shown the answer"),
    "rlsd_unrelated": (["--algo", "rlsd", "--context-source", "other"],
                       "control: RLSD with another problem's answer"),
    "opsd_unrelated": (["--algo", "opsd", "--context-source", "other"],
                       "control: OPSD with another problem's solution"),
    # what the field added after the seed papers (docs/findings.md)
    "csd": ([], "contrastive self-distillation: teachers shown a correct and a wrong sibling"),
    "opd_semi": (["--algo", "opd", "--teacher", "toy", "--rollout-refresh", "0"],
                 "Semi-OPD: OPD on the initial student's rollouts, cached"),
    # the omni task's arms (OmniOPSD: OPSD whose teacher is told what the sound says)
    "opsd_answer": (["--algo", "opsd", "--context", "answer"], "OPSD, teacher shown the answer"),
    "omniopsd": (["--algo", "opsd", "--context", "rationale"],
                 "OmniOPSD: OPSD, teacher shown the rationale (what the sound says)"),
    "omniopsd_unrelated": (["--algo", "opsd", "--context", "rationale", "--context-source",
                            "other"], "control: OmniOPSD with another clip's rationale"),
}
# the budget every arm shares (the toy defaults, except OPSD's 32 prompts per step: 16 here)
STEPS = 150
SHARED = ["--prompts-per-step", "16", "--group-size", "8", "--save-every", "50",
          "--keep-checkpoints", "1"]
# the embedded tasks a study runs on: train.py's --data, the response length, the steps and
# evaluations of every run, where it goes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
RESULTS = os.path.join(ROOT, "tools", "results")  # committed: tables, plots, the archive
STUDY_PAGE = os.path.join(ROOT, "docs", "study.md")  # the study's text; its tables between markers
EVERY_25 = ["--eval-every", "25"]
TASKS = {"toy": dict(flags=["--max-new-tokens", "40"], out=RESULTS, runs="study_runs",
                     block="study", steps=STEPS, evals=EVERY_25),
         "shapes": dict(flags=["--data", "shapes", "--max-new-tokens", "16"],
                        out=os.path.join(RESULTS, "shapes"), steps=STEPS, evals=EVERY_25,
                        runs=os.path.join("study_runs", "shapes"), block="study-shapes"),
         # the leak task: 200 steps, long enough to see a late decline, and evaluations every
         # 10 steps over the first 50, where OPSD's peak is expected (RLSD Fig. 3b, 5a)
         "chains": dict(flags=["--data", "chains", "--max-new-tokens", "64"],
                        out=os.path.join(RESULTS, "chains"), steps=200,
                        evals=EVERY_25 + ["--eval-at", "10,20,30,40"],
                        runs=os.path.join("study_runs", "chains"), block="study-chains"),
         # the omni task: 12-token answers, the same budget as the arithmetic study
         "clips": dict(flags=["--data", "clips", "--max-new-tokens", "12"],
                       # every 50 steps: a clip's generations cost several times an
                       # arithmetic one's (video and sound in every prefill); fixed before any run
                       out=os.path.join(RESULTS, "clips"), steps=STEPS,
                       evals=["--eval-every", "50"],
                       runs=os.path.join("study_runs", "clips"), block="study-clips")}
PTD_ARMS = ("grpo", "ptdpo", "ptdpo_exact", "ptdpo_forward")  # the PTD-PO table, both tasks
EARLY = 50  # the "learns faster early" column: test accuracy at this step (RLSD's lambda is 0 after it)
TIMING = ("step_time_s", "time_rollout_s", "time_teacher_s", "time_fwd_bwd_s",
          "time_optimizer_s")


def run_dir(runs: str, arm: str, seed: int) -> str:
    return os.path.join(runs, arm, f"seed{seed}")


def read(path: str) -> list[dict]:
    try:
        return evaluation.read_metrics(path)
    except FileNotFoundError:
        return []


def finished(path: str, steps: int) -> bool:
    rows = read(path)
    return bool(rows) and rows[-1].get("step") == steps and "test_acc" in rows[-1]


def command(arm: str, seed: int, out: str, teacher: str, steps: int = STEPS,
            extra: tuple = (), task: str = "toy", warm: str = "") -> list[str]:
    """train.py's command line of one run; `warm`: the seed's warm-start directory (the
    study's own copy: every run of a seed starts from the same weights whatever the cache)."""
    flags = list(ARMS[arm][0])
    if "--teacher" in flags:  # every seed distils from the same external teacher (seed 0's)
        flags[flags.index("--teacher") + 1] = teacher
    if "--algo" not in flags:
        flags = ["--algo", arm] + flags
    evals = [min(25, steps) if f == "25" else f for f in TASKS[task]["evals"]]
    return [sys.executable, os.path.join(ROOT, "train.py"), *flags, *SHARED,
            *TASKS[task]["flags"], "--steps", str(steps), *map(str, evals), "--seed", str(seed),
            "--out", out, *(["--warm-start", warm] if warm else []), *extra]


def opd_teacher_path(extra: tuple = (), task: str = "toy") -> str:
    """Where seed 0's stronger toy teacher is cached (every seed's OPD run distils from it)."""
    from engine import config
    from engine.toy import warmstart
    cfg = config.resolve_config(_given(["--algo", "opd", "--teacher", "toy", "--seed", "0",
                                        *TASKS[task]["flags"], *extra]))
    return warmstart.warm_start_path(cfg, steps=cfg.warm_start_steps, name="teacher", slip=0.0)


def student_warm_start(seed: int, extra: tuple = (), task: str = "toy") -> str:
    """Where seed `seed`'s warm start is cached (every arm of that seed starts from it)."""
    from engine import config
    from engine.toy import warmstart
    cfg = config.resolve_config(_given(["--seed", str(seed), *TASKS[task]["flags"], *extra]))
    return (warmstart.shipped_warm_start(cfg, cfg.warm_start_steps)  # shipped: no SFT to run
            or warmstart.warm_start_path(cfg, steps=cfg.warm_start_steps, name="student"))


def _given(argv: list) -> dict:
    """train.py's flag-value pairs as the values its parser hands to config.resolve_config."""
    from engine import config
    out = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        name = flag[2:].replace("-", "_")
        kind = type(config.DEFAULTS[name])
        out[name] = config._bool(value) if kind is bool else kind(value)
    return out


def environment() -> dict:
    """What a rerun's numbers depend on besides the code: library versions, the thread count
    (the study's: `child_env`), the CPU."""
    import platform
    import torch
    import transformers
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": int(child_env()["OMP_NUM_THREADS"]),
            "cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count()}


def child_env() -> dict:
    """One thread per training process, always: the tiny model gains little from a second
    thread (measured: 0.95 s an RLSD step on 2 threads, 1.15 s on 1), so `--jobs` processes
    side by side finish the study sooner, and a run's numbers do not depend on the machine's
    core count (a float sum split over threads is ordered differently)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def timed(cmd: list[str], runs: str, arm: str, seed: int, log_name: str) -> int:
    """Run one process with its output in its own log; record its wall time."""
    with open(os.path.join(runs, "study.log"), "a") as log:
        log.write(" ".join(cmd) + "\n")
    started = time.time()
    with open(os.path.join(runs, log_name), "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    # every process, warm starts included, so that the report can say how long the study took
    with open(os.path.join(runs, "study_time.jsonl"), "a") as f:
        f.write(json.dumps({"arm": arm, "seed": seed, "rc": rc, "start": started,
                            "minutes": (time.time() - started) / 60}) + "\n")
    return rc


def pool(tasks, jobs: int, what: str):
    """Run (label, thunk) tasks, `jobs` at a time, in order; stop starting new ones after a
    failure and name every failure at the end."""
    from concurrent.futures import ThreadPoolExecutor
    failed, t0 = [], time.time()

    def one(i, label, thunk):
        if failed:
            return
        print(f"study: {what} {i + 1}/{len(tasks)}: {label} (started at "
              f"{(time.time() - t0) / 60:.0f} min)", flush=True)
        rc = thunk()
        if rc:
            failed.append(f"{label} (exit {rc})")

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(lambda a: one(*a), [(i, *t) for i, t in enumerate(tasks)]))
    if failed:
        raise SystemExit(f"study: failed: {', '.join(failed)}; see the logs in the runs "
                         f"directory; rerun to continue")


def run_all(arms, seeds, runs: str, steps: int, extra: tuple = (), jobs: int = 1,
            task: str = "toy"):
    with open(os.path.join(runs, "environment.json"), "w") as f:  # what the runs ran on
        json.dump(environment(), f, indent=1)
    # first every warm start (and OPD's teacher), in parallel: the runs of a seed share one
    def have(name, cached):  # the study's own copy, or the cache's
        return (os.path.exists(os.path.join(runs, "warm", name, "model.safetensors"))
                or os.path.exists(cached))
    prep = [("student", seed) for seed in seeds
            if not have(f"seed{seed}", student_warm_start(seed, extra, task))]
    wants_teacher = any("--teacher" in ARMS[a][0] or a == "opd" for a in arms)
    if wants_teacher and not have("opd-teacher", opd_teacher_path(extra, task)):
        prep.append(("teacher", 0))
    tasks = []
    for kind, seed in prep:
        algo = ["--algo", "opd", "--teacher", "toy"] if kind == "teacher" else ["--algo", "grpo"]
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *algo, "--steps", "0", "--eval-data", "",
               "--seed", str(seed), "--out", os.path.join(runs, "warm", f"{kind}{seed}"),
               "--overwrite", *TASKS[task]["flags"], *extra]
        tasks.append((f"warm start ({kind}) seed {seed}",
                      lambda c=cmd, k=kind, s=seed: timed(c, runs, f"warm start ({k})", s,
                                                          f"warm-{k}{s}.log")))
    pool(tasks, jobs, "warm start")
    # the study's own copies: every run of a seed starts from these weights, whatever later
    # happens to the cache (its key follows the code), and the archive keeps them
    for src, name in [(student_warm_start(s, extra, task), f"seed{s}") for s in seeds] + (
            [(opd_teacher_path(extra, task), "opd-teacher")] if wants_teacher else []):
        copy_warm(src, os.path.join(runs, "warm", name))
    teacher = os.path.join(runs, "warm", "opd-teacher")
    tasks = []
    for seed in seeds:  # seed-major: a partial study has whole seeds
        for arm in arms:
            out = run_dir(runs, arm, seed)
            if finished(out, steps):
                continue
            ckpts = os.listdir(out) if os.path.isdir(out) else []
            resume = (["--resume"] if any(n.startswith("checkpoint-") for n in ckpts)
                      else ["--overwrite"])
            cmd = command(arm, seed, out, teacher, steps, extra, task,
                          warm=os.path.join(runs, "warm", f"seed{seed}")) + resume
            tasks.append((f"{arm} seed {seed}",
                          lambda c=cmd, a=arm, s=seed: timed(c, runs, a, s, f"{a}-seed{s}.log")))
    pool(tasks, jobs, "run")


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------

def mean_std(xs, pct: bool = False) -> str:
    """'mean ± std' over seeds (sample std); fractions as percentages with pct."""
    xs = [x * 100 if pct else x for x in xs if x is not None]
    if not xs:
        return "-"
    fmt = (lambda v: f"{v:.1f}") if pct else (lambda v: f"{v:.3g}")  # noqa: E731
    if len(xs) == 1:
        return fmt(xs[0])
    return f"{fmt(statistics.mean(xs))} ± {fmt(statistics.stdev(xs))}"


def summarise(rows: list[dict], target: float | None) -> dict:
    evals = [r for r in rows if "test_acc" in r]
    train = [r for r in rows if r.get("step", 0) > 0 and "entropy" in r]
    reach = next((r["step"] for r in evals if target is not None and r["test_acc"] >= target), None)
    early = [r["test_acc"] for r in evals if r["step"] == EARLY]
    return {"final": evals[-1]["test_acc"], "best": max(r["test_acc"] for r in evals),
            "early": early[0] if early else None,
            "ood": evals[-1].get("ood_acc"), "steps_to_grpo": reach,
            "entropy": statistics.mean(r["entropy"] for r in train[-10:]),
            "leakage": evals[-1].get("test_leakage"),
            "length": statistics.mean(r["response_len_mean"] for r in train),
            "step_s": statistics.median(r["step_time_s"] for r in train),
            "start": evals[0]["test_acc"], "start_teacher": evals[0].get("test_teacher_acc")}


def eval_schedule(task: str) -> str:
    """The task's evaluation steps in words, from its flags: "every 25 steps", "at steps 10, 20
    and every 25 steps"."""
    flags = TASKS[task]["evals"]
    every = f"every {flags[flags.index('--eval-every') + 1]} steps"
    if "--eval-at" not in flags:
        return every
    return f"at steps {flags[flags.index('--eval-at') + 1].replace(',', ', ')} and {every}"


def report(arms, seeds, runs: str, steps: int = STEPS, out_dir: str = RESULTS,
           readme: str = STUDY_PAGE, task: str = "toy", extra: tuple = ()):
    os.makedirs(out_dir, exist_ok=True)
    data = {a: {s: read(run_dir(runs, a, s)) for s in seeds
                if finished(run_dir(runs, a, s), steps)} for a in arms}
    data = {a: d for a, d in data.items() if d}
    if "grpo" not in data:
        raise SystemExit("study: no finished GRPO run yet (the table is relative to it)")
    # each seed has its own warm start, so "as good as GRPO" is per seed: its GRPO run's final
    target = {s: summarise(r, None)["final"] for s, r in data["grpo"].items()}
    summ = {a: {s: summarise(r, target.get(s)) for s, r in d.items()} for a, d in data.items()}
    with open(os.path.join(run_dir(runs, "grpo", next(iter(data["grpo"]))), "config.json")) as f:
        n = json.load(f)["eval_n"]
    lines = [f"Greedy accuracy (%) on {n} test problems (standard error up to "
             f"{50 / math.sqrt(n):.1f} points per run); mean ± "
             f"std over seeds; steps to GRPO's final accuracy: the first evaluation "
             f"({eval_schedule(task)}) at which a run reaches the final accuracy of GRPO's run "
             f"of the same seed.",
             "",
             f"| arm | seeds | test at step {EARLY} | final test | final - GRPO's, same seed "
             "| best test | OOD | steps to GRPO's final | entropy (last 10 steps) | leakage "
             "| response length | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, per in summ.items():
        col = lambda k: mean_std([v[k] for v in per.values()],  # noqa: E731
                                 pct=k in ("early", "final", "best", "ood", "leakage"))
        reached = [v["steps_to_grpo"] for v in per.values()]
        steps = (mean_std(reached) if None not in reached
                 else f"{sum(x is not None for x in reached)}/{len(reached)} reach it")
        # each seed's own warm start differs (table footer): the paired difference removes it
        diff = mean_std([v["final"] - summ["grpo"][s]["final"] for s, v in per.items()
                         if s in summ["grpo"]], pct=True)
        lines.append(f"| {a} | {len(per)} | {col('early')} | {col('final')} | {diff} | "
                     f"{col('best')} | {col('ood')} | "
                     f"{steps} | {col('entropy')} | {col('leakage')} | {col('length')} | "
                     f"{col('step_s')} |")
    lines += (["", paired(summ, "rlsd", "grpo"), "", clip_line(data["rlsd"])]
              if "rlsd" in data else []) + ["",
              "Each seed's warm start (step 0): "
              + "; ".join(f"seed {s}: student {v['start']:.1%}, shown the answer "
                          f"{v['start_teacher']:.1%}" for s, v in summ["grpo"].items())]
    timing, env = os.path.join(runs, "study_time.jsonl"), read_environment(runs)
    if os.path.exists(timing):  # every process the study ran, interrupted ones included
        with open(timing) as f:
            spans = [json.loads(line) for line in f if line.strip()]
        machine = (f"{env['cores']} cores of {env['cpu']}, torch {env['torch']}, transformers "
                   f"{env['transformers']}" if env else f"{os.cpu_count()} CPU cores")
        lines.append(f"Time of these runs (warm starts and OPD's teacher included; {machine}; "
                     f"one thread per process, --jobs side by side): "
                     f"{wall_hours(spans):.1f} h wall time, "
                     f"{sum(t['minutes'] for t in spans) / 60:.1f} h summed over processes.")
    teacher = os.path.join(runs, "opd_teacher.json")
    if os.path.exists(teacher):
        with open(teacher) as f:
            lines.append(f"OPD's teacher (seed 0, SFT on careful demonstrations), greedy test "
                         f"accuracy: {json.load(f)['pass@1_greedy']:.1%}.")
    table = "\n".join(lines)
    flag = "" if task == "toy" else f" --data {task}"
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(f"# Study results{': ' + task if flag else ''}\n\nGenerated by `python "
                f"tools/study.py{flag} --report` from the runs in `{runs}/`.\n\n{table}\n")
    replace_block(readme, table, TASKS[task]["block"])
    plots(data, out_dir)
    forest(summ, out_dir, task)
    archive(data, runs, os.path.join(out_dir, "runs"), task, extra)
    ptd = ptd_table()
    if ptd:
        replace_block(readme, ptd, "study-ptd")
    if task in ("chains", "clips"):
        if task == "chains":
            claim_plots(data, out_dir)
        claims_text = claims_report(readme)
        with open(os.path.join(out_dir, "RESULTS.md"), "a") as f:
            f.write(f"\n## The claims\n\n{claims_text}\n")
    ablated = ablation_table(os.path.join(out_dir, "ablation"))
    if ablated:  # clips: the final checkpoints' `eval.py --ablate` outputs, when saved there
        with open(os.path.join(out_dir, "RESULTS.md"), "a") as f:
            f.write(f"\n## The final checkpoints with the video removed\n\n{ablated}\n")
        replace_block(os.path.join(ROOT, "docs", "multimodal.md"), ablated, "clips-ablation")
    print(table)


def ablation_table(folder: str) -> str:
    """Greedy test accuracy (%) by kind of question, mean over seeds, from the files
    `ARM-SEED-none.jsonl` and `ARM-SEED-video.jsonl` that `eval.py CKPT --data clips --out`
    wrote for each run's final checkpoint (without and with `--ablate video`)."""
    if not os.path.isdir(folder):
        return ""
    acc = {}  # (arm, ablation) -> split -> [accuracy per seed]
    for name in sorted(os.listdir(folder)):
        arm, _, ablation = name.removesuffix(".jsonl").rpartition("-")
        arm = arm.rpartition("-")[0]
        with open(os.path.join(folder, name)) as f:
            for line in f:
                r = json.loads(line)
                acc.setdefault((arm, ablation), {}).setdefault(r["split"], []).append(
                    100 * r["pass@1_greedy"])
    mean = lambda arm, ab, split: f"{statistics.mean(acc[arm, ab][split]):.1f}"  # noqa: E731
    lines = ["| final checkpoint | seeds | all | picture | sound | both | both, video removed |",
             "|---|---|---|---|---|---|---|"]
    for arm in [a for a in ARMS if (a, "none") in acc and (a, "video") in acc]:
        lines.append(f"| {arm} | {len(acc[arm, 'none']['test'])} | "
                     + " | ".join(mean(arm, "none", k) for k in
                                  ("test", "test/video", "test/audio", "test/both"))
                     + f" | {mean(arm, 'video', 'test/both')} |")
    return "\n".join(lines)


def archived(task: str, arms) -> dict:
    """{arm: {seed: metrics rows}} of a task's committed archive (its finished runs)."""
    runs = os.path.join(TASKS[task]["out"], "runs")
    data = {a: {s: read(run_dir(runs, a, s)) for s in range(20)} for a in arms}
    return {a: {s: r for s, r in per.items() if finished(run_dir(runs, a, s), TASKS[task]["steps"])}
            for a, per in data.items()}


def claims_report(page: str = STUDY_PAGE) -> str:
    """The claims table from the committed archives (tools/claims.py: each verdict by its
    rule), written into README.md and the study page between their `claims` markers."""
    rows = claims.rows_for(archived("chains", ARMS)) + claims.clips_rows(archived("clips", ARMS))
    toy, shapes = archived("toy", PTD_ARMS), archived("shapes", PTD_ARMS)
    for name, per in (("arithmetic", toy), ("shapes", shapes)):
        if per.get("ptdpo") and per.get("grpo"):
            d, n = claims.paired(per["ptdpo"], per["grpo"], claims.final)
            ci = claims.interval(d)
            rows.append(("PTD-PO (arXiv 2606.07000)", f"PTD-PO improves over GRPO ({name})",
                         f"final, PTD-PO as released - GRPO: {claims.fmt(ci, n)}",
                         claims.verdict_gain(ci), "its released Top-K JSD has zero gradient "
                         "(docs/findings.md)"))
    text = (claims.table(rows) + "\n\nRules of the verdicts (fixed before the runs): "
            + "; ".join(f"{k}: {v}" for k, v in claims.RULES.items()) + ".")
    replace_block(os.path.join(ROOT, "README.md"), claims.table(rows), "claims")
    replace_block(page, text, "claims")
    return text


def claim_plots(data: dict, out_dir: str):
    """RLSD Fig. 3a's analogue (leakage over steps per arm, GRPO the floor) and the accuracy
    and teacher-KL curves as small multiples, mean and band (+- one std over seeds)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    def band(ax, per_seed, key, label, train=False, **style):
        pts = {}
        for rows in per_seed.values():
            for r in rows:
                if key in r and (r["step"] > 0 or not train):
                    pts.setdefault(r["step"], []).append(r[key])
        steps = sorted(pts)
        m = [statistics.mean(pts[s]) for s in steps]
        sd = [statistics.stdev(pts[s]) if len(pts[s]) > 1 else 0.0 for s in steps]
        line, = ax.plot(steps, m, label=f"{label} ({len(per_seed)})", **style)
        ax.fill_between(steps, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                        color=line.get_color(), alpha=0.15)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, per in data.items():
        band(ax, per, "test_leakage", arm, **({"color": "black", "linestyle": "--"}
                                              if arm == "grpo" else {}))
    ax.set(title="leakage of the student's test responses (cites a reference it never saw, or "
                 "an unsupported answer)", xlabel="step", ylabel="share of responses")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "leakage.png"), dpi=110)
    plt.close(fig)
    arms = list(data)
    for key, name, train in (("test_acc", "accuracy_small.png", False),
                             ("teacher_kl", "teacher_kl_small.png", True)):
        shown = [a for a in arms if any(key in r for rows in data[a].values() for r in rows)]
        if not shown:
            continue
        cols = min(4, len(shown))
        rows_n = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), sharey=True,
                                 squeeze=False)
        for ax, arm in zip(axes.flat, shown):
            if arm != "grpo" and "grpo" in data and key == "test_acc":
                band(ax, data["grpo"], key, "grpo", train, color="grey")
            band(ax, data[arm], key, arm, train)
            ax.set_title(arm, fontsize=9)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        fig.suptitle(("greedy test accuracy" if key == "test_acc" else "teacher-student KL on "
                      "the student's tokens (nats)") + ": mean and +- one std over seeds",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)


# the files of a warm start a rerun needs (its weights, config and tokenizer; not the SFT's
# optimizer state): about 1.2 MB for the arithmetic toy, 1 MB for the shapes task's
WARM_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "preprocessor_config.json")


def archive(data, runs: str, dest: str, task: str = "toy", extra: tuple = ()):
    """Copy what the report reads (each finished run's metrics.jsonl and config.json, the
    timings, OPD's teacher accuracy, the environment) and what a rerun starts from (each
    seed's warm start, OPD's teacher) to `dest`, which is committed: `--report --runs dest`
    rebuilds the table and plots, and `--check ARM:SEED --runs dest` reruns a run from the
    same weights and compares it with them, on a fresh clone, without the checkpoints."""
    if os.path.abspath(runs) == os.path.abspath(dest):
        return
    for arm, per in data.items():
        for seed in per:
            src, dst = run_dir(runs, arm, seed), run_dir(dest, arm, seed)
            os.makedirs(dst, exist_ok=True)
            for name in ("metrics.jsonl", "config.json"):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    for name in ("study_time.jsonl", "opd_teacher.json", "environment.json"):
        if os.path.exists(os.path.join(runs, name)):
            shutil.copyfile(os.path.join(runs, name), os.path.join(dest, name))
    seeds = sorted({s for per in data.values() for s in per})
    for name in [f"seed{s}" for s in seeds] + (["opd-teacher"] if "opd" in data
                                               or "opd_semi" in data else []):
        copy_warm(os.path.join(runs, "warm", name), os.path.join(dest, "warm", name))


def copy_warm(src: str, dst: str):
    """A warm start's WARM_FILES from `src` to `dst` (kept if `dst` already holds one)."""
    if not os.path.isdir(src) or os.path.exists(os.path.join(dst, "model.safetensors")):
        return
    os.makedirs(dst, exist_ok=True)
    for f in WARM_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def read_environment(runs: str) -> dict:
    path = os.path.join(runs, "environment.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def clip_line(rlsd: dict) -> str:
    """How often RLSD's evidence weight is clipped while lambda > 0 (after that w is 1)."""
    per = {s: [r["rlsd_weight_clip_frac"] for r in rows
               if r.get("step", 0) > 0 and r.get("rlsd_lambda", 0) > 0]
           for s, rows in rlsd.items()}
    per = {s: v for s, v in per.items() if v}
    if not per:
        return "RLSD's weight clip: no RLSD run with lambda > 0."
    every = [x for v in per.values() for x in v]
    return (f"RLSD's weight clip while lambda > 0: active on {statistics.mean(every):.1%} of the "
            f"tokens with a nonzero advantage (per step {min(every):.1%} to {max(every):.1%}; "
            "per seed " + ", ".join(f"{statistics.mean(v):.1%}" for v in per.values()) + ").")


def wall_hours(spans: list[dict]) -> float:
    """Hours during which at least one of the processes ran (the union of their intervals)."""
    total, end = 0.0, -math.inf
    for t0, t1 in sorted((t["start"], t["start"] + 60 * t["minutes"]) for t in spans):
        total += max(0.0, t1 - max(t0, end))
        end = max(end, t1)
    return total / 3600


def paired(summ, a: str, b: str) -> str:
    seeds = sorted(set(summ.get(a, {})) & set(summ.get(b, {})))
    if len(seeds) < 2:
        return f"Paired {a} - {b}: needs two seeds of both."
    d = [summ[a][s]["final"] - summ[b][s]["final"] for s in seeds]
    m, lo, hi = claims.interval(d)
    return (f"Paired {a.upper()} - {b.upper()}, final test accuracy, same seeds ({len(d)}): "
            f"{m:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}] "
            f"(Student t, {len(d) - 1} df; per seed: "
            + ", ".join(f"{x * 100:+.1f}" for x in d) + ").")


def replace_block(path: str, text: str, name: str = "study"):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not os.path.exists(path):
        return
    with open(path) as f:
        s = f.read()
    if begin not in s or end not in s:
        return
    head, rest = s.split(begin, 1)
    new = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def plots(data, out_dir: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: plots need matplotlib (pip install -e '.[plot]'); table written")
        return

    colours = plt.get_cmap("tab20").colors  # 13 arms: the default cycle repeats after 10

    def curve(ax, rows_by_seed, key, label, **style):
        steps = sorted({r["step"] for rows in rows_by_seed.values() for r in rows if key in r})
        per_step = [[r[key] for rows in rows_by_seed.values() for r in rows
                     if r["step"] == s and key in r] for s in steps]
        mean = [statistics.mean(v) for v in per_step]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
        line, = ax.plot(steps, mean, label=label, **style)
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)],
                        [m + s for m, s in zip(mean, sd)], color=line.get_color(), alpha=0.15)

    for key, name, title in (("test_acc", "test_acc.png", "greedy test accuracy"),
                             ("entropy", "entropy.png", "entropy of the sampled tokens"),
                             ("test_leakage", "leakage.png", "leakage (test responses)")):
        if not any(key in r for d in data.values() for rows in d.values() for r in rows):
            continue  # a task without the metric (clips has no leak marker): no empty plot
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm, d in data.items():  # a variant of an arm (a control, a PTD direction): dashed
            variant = arm not in config_algos()
            curve(ax, d, key, arm, color=colours[list(ARMS).index(arm) % len(colours)],
                  linestyle="--" if variant else "-")
        ax.set(title=f"{title}: mean ± std over seeds", xlabel="optimizer step")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
    if "rlsd" in data:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        curve(ax, data["rlsd"], "rlsd_lambda", "lambda")
        curve(ax, data["rlsd"], "rlsd_weight_clip_frac", "weight clip fraction")
        ax.set(title="RLSD: lambda and clip fraction, mean ± std over seeds", xlabel="step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "rlsd.png"), dpi=110)
        plt.close(fig)


def config_algos() -> tuple:
    from engine import config
    return config.ALGOS


def forest(summ: dict, out_dir: str, task: str = "toy"):
    """One figure to take in at a glance: each arm's final test accuracy minus GRPO's on the
    same seed (its own warm start), mean and 95% Student-t interval over seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = []
    for arm, per in summ.items():
        d = [v["final"] - summ["grpo"][s]["final"] for s, v in per.items() if s in summ["grpo"]]
        if arm == "grpo" or len(d) < 2:
            continue
        m, lo, hi = claims.interval(d)  # points
        rows.append((arm, m, hi - m, [x * 100 for x in d]))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(rows) + 1.3))
    for y, (arm, m, half, d) in enumerate(rows[::-1]):
        ax.errorbar(m, y, xerr=half, fmt="o", color="C0", capsize=3)
        ax.plot(d, [y] * len(d), "x", color="C1", alpha=0.7)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows[::-1]])
    ax.set_xlabel("final test accuracy - GRPO's, same seed (points): mean and 95% CI; x: seeds")
    ax.set_title(f"Paired difference to GRPO ({'arithmetic' if task == 'toy' else task} task, "
                 f"{len(rows[0][3])} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "forest.png"), dpi=110)
    plt.close(fig)


def ptd_table() -> str:
    """The PTD-PO table of both tasks, from the committed archives: each direction's final
    test accuracy and its paired difference to GRPO (same seeds, 95% t interval)."""
    cells, seeds_of, tasks = {}, {}, ("toy", "shapes")
    for task in tasks:
        runs = os.path.join(TASKS[task]["out"], "runs")
        finals = {a: {s: read(run_dir(runs, a, s)) for s in range(10)} for a in PTD_ARMS}
        finals = {a: {s: [r for r in rows if "test_acc" in r][-1]["test_acc"]
                      for s, rows in per.items() if finished(run_dir(runs, a, s), STEPS)}
                  for a, per in finals.items()}
        if not all(finals[a] for a in PTD_ARMS):
            return ""
        for a in PTD_ARMS:
            seeds = sorted(set(finals[a]) & set(finals["grpo"]))
            d = [finals[a][s] - finals["grpo"][s] for s in seeds]
            mean = mean_std(list(finals[a].values()), pct=True)
            if a == "grpo" or len(d) < 2:
                cells[a, task] = f"{mean} |"
                continue
            m, lo, hi = claims.interval(d)  # points
            cells[a, task] = f"{mean} | {m:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            seeds_of[task] = len(d)
    what = {"grpo": "GRPO (baseline)", "ptdpo": "PTD-PO as released (`jsd`: zero gradient)",
            "ptdpo_exact": "PTD-PO, exact JSD (`--ptd-divergence jsd-exact`)",
            "ptdpo_forward": "PTD-PO, KL(T || S) (`--ptd-divergence forward`)"}
    lines = ["| arm | arithmetic: final test % | - GRPO's, paired (95% CI) | shapes: final test % "
             "| - GRPO's, paired (95% CI) |", "|---|---|---|---|---|"]
    for a in PTD_ARMS:
        lines.append(f"| {what[a]} | " + " | ".join(
            cells[a, t] if a != "grpo" else cells[a, t] + " |" for t in tasks).replace("| |", "|")
            + " |")
    return "\n".join(lines) + (f"\n\nSeeds: {seeds_of.get('toy', 0)} (arithmetic), "
                               f"{seeds_of.get('shapes', 0)} (shapes); every setting the study's "
                               f"(`python tools/study.py --arms {','.join(PTD_ARMS)}` and the same "
                               f"with `--data shapes`).")


def check(spec: str, runs: str, steps: int = STEPS, first: int = 3, extra: tuple = (),
          task: str = "toy") -> int:
    """Rerun a logged run (same flags, so the same learning-rate schedule) from the weights it
    started from until it has logged `first` steps, then stop it (SIGTERM: train.py ends after
    the step in progress). Says what differs in the environment (library versions, threads,
    CPU), then "identical" (0) or the first differing metric and its relative size (1)."""
    arm, seed = spec.split(":")
    logged = read(run_dir(runs, arm, int(seed)))
    if not logged:
        raise SystemExit(f"study: no logged run {arm} seed {seed} in {runs}")
    warm, teacher = (os.path.join(runs, "warm", n) for n in (f"seed{seed}", "opd-teacher"))
    if os.path.isdir(warm):
        print(f"study: starting from the archived warm start {warm}")
    else:
        warm = ""
        print(f"study: no archived warm start in {runs}: the cached or a rebuilt one")
    if not os.path.isdir(teacher):
        teacher = opd_teacher_path(extra, task)
    then, now = read_environment(runs), environment()
    differ = [f"{k} {then[k]} -> {now[k]}" for k in ("torch", "transformers", "python",
                                                     "threads", "cpu", "cores")
              if k in then and then[k] != now[k]]
    print("study: environment " + ("differs from the archive's: " + "; ".join(differ)
                                   if differ else "the same as the archive's" if then
                                   else "of the archive not recorded"))
    out = tempfile.mkdtemp(prefix="study-check-")
    cmd = command(arm, int(seed), out, teacher, steps, extra, task, warm=warm)
    cmd[cmd.index("--eval-every") + 1] = "0"  # evaluation consumes no randomness: skip it
    if "--eval-at" in cmd:
        cmd[cmd.index("--eval-at") + 1] = ""
    # the rerun's own lines (its progress, and the resume hint it prints when stopped) go to a
    # file: they are shown only if it fails before logging the steps to compare
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd + ["--overwrite"], stdout=log, stderr=log, env=child_env())
        while proc.poll() is None and max((r["step"] for r in read(out)), default=0) < first:
            time.sleep(0.2)
        proc.terminate()
        proc.wait()
    fresh = {r["step"]: r for r in read(out)}
    compared = [r for r in logged if 1 <= r["step"] <= first and r["step"] in fresh]
    bad = [(r["step"], k, r[k], fresh[r["step"]].get(k)) for r in compared for k in r
           if k not in TIMING and not k.endswith("_acc") and k != "test_leakage"
           and fresh[r["step"]].get(k) != r[k]]
    steps_done = [r["step"] for r in compared]
    if not compared:
        with open(out + ".log") as log:
            tail = log.read()[-2000:]
        print(f"study: {arm} seed {seed}: nothing to compare (the rerun logged no step); its "
              f"last output:\n{tail}")
        return 1
    if not bad:
        print(f"study: {arm} seed {seed}, steps {steps_done}: every metric identical")
        return 0
    step, key, was, got = bad[0]
    size = (abs(got - was) / max(abs(was), 1e-12) if isinstance(was, float)
            and isinstance(got, float) else None)
    print(f"study: {arm} seed {seed}, steps {steps_done}: {len(bad)} metrics differ; the first "
          f"at step {step}: {key} logged {was}, rerun {got}"
          + (f" (relative difference {size:.1e})" if size is not None else ""))
    return 1


def main(argv=None):
    p = argparse.ArgumentParser(description="Every method side by side on an embedded task.")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each its own warm start)")
    p.add_argument("--data", default="toy", choices=sorted(TASKS),
                   help="the embedded task: toy (arithmetic), chains (worded arithmetic, on "
                        "which a reference can leak) or shapes (pictures, a tiny Qwen3-VL)")
    p.add_argument("--runs", default=None,
                   help="where the runs go (default study_runs, study_runs/shapes; not committed: "
                        "the report copies their metrics and warm starts to OUT/runs, which is, "
                        "so `--report --runs tools/results/runs` works on a fresh clone)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default: the task's, 150; chains 200)")
    p.add_argument("--out", default=None, help="where RESULTS.md, the plots and the archive go "
                   "(default tools/results, tools/results/shapes)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="training processes side by side, one thread each (default: the "
                        "number of CPU cores)")
    p.add_argument("--report", action="store_true", help="only the report, from finished runs")
    p.add_argument("--check", metavar="ARM:SEED", help="rerun a run's first steps from its "
                   "archived warm start and compare them with the logged ones")
    p.add_argument("--train-flags", default="",
                   help="more train.py flags for every run, e.g. '--cache-dir DIR' (the tests)")
    a = p.parse_args(argv)
    task = TASKS[a.data]
    runs, out_dir = a.runs or task["runs"], a.out or task["out"]
    arms, seeds = a.arms.split(","), [int(s) for s in a.seeds.split(",")]
    a.steps = a.steps or task["steps"]
    extra = tuple(a.train_flags.split())
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if a.check:
        raise SystemExit(check(a.check, runs, a.steps, extra=extra, task=a.data))
    if not a.report:
        os.makedirs(runs, exist_ok=True)
        run_all(arms, seeds, runs, a.steps, extra, jobs=max(1, a.jobs), task=a.data)
        teacher, out = opd_teacher_path(extra, a.data), os.path.join(runs, "opd_teacher.json")
        if "opd" in arms and os.path.exists(teacher) and not os.path.exists(out):
            res = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), teacher, "--n", "500", "--data",
                                  a.data], capture_output=True, text=True, check=True,
                                 env=child_env())
            with open(out, "w") as f:
                f.write(res.stdout.strip().splitlines()[0] + "\n")  # the test split's line
    report(arms, seeds, runs, a.steps, out_dir=out_dir, task=a.data, extra=extra,
           readme=STUDY_PAGE if out_dir == task["out"] else os.path.join(out_dir, "study.md"))


if __name__ == "__main__":
    main()
