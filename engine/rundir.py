"""The run directory (--out) and the process around a run: never lose or mix up a run.

    claim_run_dir   refuse a non-empty --out unless --resume or --overwrite; lock it, so a
                    second run on the same --out is refused (the lock dies with its process)
    RunLog          config.json, metrics.jsonl (and the trackers), the console lines
    start_metrics_log  metrics.jsonl without the lines of steps a resume will redo
    file_lock       an exclusive lock on a file, waited for (the toy warm-start cache)
    writing         a failed write is one message naming the directory and its free space
    StopSignals     SIGTERM / Ctrl-C end the run after the step in progress, not in the middle
                    of it; evaluation and the warm start they end at once (`Stopped`)
    RunGuard        the checks between two steps: too many non-finite steps, most responses
                    cut off, a checkpoint due, a stop signal on any rank
"""
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time

RUN_FILES = ("config.json", "metrics.jsonl")  # plus checkpoint-NNNNNN directories
MARKER = ".rlsd-run"  # written into every run directory: what --overwrite may clear
OURS = RUN_FILES + (MARKER, ".lock", "config.json.tmp", "metrics.jsonl.tmp", "tensorboard",
                    "wandb", "trackio")  # every name a run writes (the trackers' too)
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _run_entries(out: str) -> list:
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n not in (".lock", MARKER))


def _ours(name: str) -> bool:
    return name in OURS or bool(_NAME.match(name.removesuffix(".tmp")))


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a .tmp directory is never complete)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.exists(os.path.join(path, "trainer_state.pt")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str) -> str | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None



def claim_run_dir(cfg):
    """Create --out and hold its lock for the life of this process (rank 0 only). Returns the
    open lock file. Refuses to start over an earlier run unless told what to do with it."""
    existing = _run_entries(cfg.out)
    if existing and not cfg.resume:
        if not cfg.overwrite:
            raise SystemExit(f"config error: --out {cfg.out} is not empty ({', '.join(existing[:4])}"
                             f"{', ...' if len(existing) > 4 else ''}); add --resume to continue "
                             f"that run, --overwrite to replace it, or choose another --out")
        check_overwrite(cfg, existing)
    with writing(cfg.out, "the run directory and its lock file"):
        return _lock_run_dir(cfg, existing)


def check_overwrite(cfg, existing: list):
    """--overwrite clears only a directory this project made a run in (its MARKER), holding
    nothing but what a run writes, and never the model being trained: a model directory, a
    home directory or another tool's checkpoint-best/ is refused with one message."""
    out = os.path.realpath(cfg.out)
    for flag in ("model", "teacher", "warm_start", "data"):
        for value in str(getattr(cfg, flag, "")).split(","):
            path = os.path.realpath(value.rpartition("=")[2]) if value else ""
            if path and (path == out or path.startswith(out + os.sep)):
                raise SystemExit(f"config error: --overwrite would delete --{flag.replace('_', '-')}"
                                 f" {value}, which is inside --out {cfg.out}; choose another --out")
    if not os.path.exists(os.path.join(cfg.out, MARKER)):
        raise SystemExit(f"config error: --overwrite clears only a run directory of this project, "
                         f"and {cfg.out} is not one (no {MARKER}); choose another --out")
    others = [n for n in existing if not _ours(n)]
    if others:
        raise SystemExit(f"config error: --overwrite: {cfg.out} also holds {', '.join(others[:4])}"
                         f"{', ...' if len(others) > 4 else ''}, which no run wrote; move them "
                         f"away, or choose another --out")


def _lock_run_dir(cfg, existing: list):
    os.makedirs(cfg.out, exist_ok=True)
    lock = open(os.path.join(cfg.out, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise SystemExit(f"config error: --out {cfg.out} is in use by a running training "
                         f"(pid {owner}); wait for it, or choose another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    if existing and cfg.overwrite and not cfg.resume:  # only what a run writes (checked)
        for name in existing:
            path = os.path.join(cfg.out, name)
            if _ours(name) and name != ".lock":
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with open(os.path.join(cfg.out, MARKER), "w") as f:  # this is a run directory
        f.write("a run directory of rlsd-reference (train.py); --overwrite may clear it\n")
    return lock


class RunLog:
    """What a run writes as it goes, on rank 0 only: config.json (the resolved options,
    replaced atomically), one JSON line per step in metrics.jsonl (appended and flushed: a
    crash loses no step; on resume the lines after the checkpoint are dropped, they will be
    redone), the trackers (--report-to) and the console. A failed write is one message."""

    def __init__(self, cfg, start: int, *, tracker=None, main: bool = True):
        self.out, self.tracker, self.main = cfg.out, tracker, main
        self.path = os.path.join(cfg.out, "metrics.jsonl")
        if main:
            with writing(cfg.out, "config.json and metrics.jsonl"):
                with open(os.path.join(cfg.out, "config.json.tmp"), "w") as f:
                    json.dump(dataclasses.asdict(cfg), f, indent=2)
                os.replace(os.path.join(cfg.out, "config.json.tmp"),
                           os.path.join(cfg.out, "config.json"))
                start_metrics_log(self.path, start)

    def log(self, record: dict):
        if self.main:
            with writing(self.out, f"step {record['step']}'s metrics",
                         f"The checkpoints in {self.out} are intact"):
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.tracker is not None:
                    self.tracker.log(record)

    def outputs(self, checkpoint: str | None, lora: bool):
        """The run's last console line: where its outputs are, and what to run next."""
        if self.main and checkpoint:
            kind = "PEFT adapter" if lora else "Hugging Face model"
            print(f"outputs in {self.out}: metrics.jsonl (one line per step), config.json, "
                  f"{checkpoint} (a {kind} directory).\nnext: python eval.py {checkpoint}   |   "
                  f"python eval.py --compare {self.out} OTHER_RUN --plot cmp.png", flush=True)

    def show(self, when: str, values: dict):
        if self.main:
            print(f"{when}: " + " | ".join(f"{k}={v:.3f}" for k, v in values.items()),
                  flush=True)


class RunGuard:
    """What the loop decides between two steps, on every rank alike: stop after --max-skips
    consecutive non-finite steps (the weights were not updated: the last checkpoint is good),
    warn once when most responses hit --max-new-tokens, checkpoint on the --save-every
    schedule, after the last step and (--save-on-signal) when stopped, and stop after this
    step when a signal reached any rank (all-reduced: a rank that carried on alone would hang
    in its next collective). A signal that arrives while a checkpoint is written is acted on
    after that write, not one step later."""

    def __init__(self, cfg, stop: "StopSignals", dist, start: int):
        self.cfg, self.stop, self.dist = cfg, stop, dist
        self.skips, self.warned, self.last_saved, self.signalled = 0, False, start, False
        self.steps = self.taken = 0  # steps run here, and those whose update was taken

    def check(self, step: int, m: dict):
        cfg = self.cfg
        if self.dist.rank == 0 and not self.warned and m.get("truncated_frac", 0) > 0.5:
            self.warned = True  # rewards are ~0 without a final answer: nothing is learned
            print(f"warning: {m['truncated_frac']:.0%} of the responses hit --max-new-tokens "
                  f"{cfg.max_new_tokens} (reward 0 without a final answer); raise it",
                  flush=True)
        self.skips = self.skips + 1 if m["skipped"] else 0
        self.steps, self.taken = self.steps + 1, self.taken + (not m["skipped"])
        if self.skips >= cfg.max_skips:  # going on would only burn compute
            raise SystemExit(f"stopping at step {step}: {self.skips} consecutive steps with a "
                             f"non-finite loss or gradient norm (loss={m['loss']}, "
                             f"grad_norm={m['grad_norm']}); weights were not updated, the "
                             f"last checkpoint in {cfg.out} is intact. Lower --lr or check "
                             f"the data.")

    def finish(self):
        """A run none of whose steps updated the weights did not succeed: not exit 0."""
        if self.steps and not self.taken:
            raise SystemExit(f"error: every one of the {self.steps} steps had a non-finite loss "
                             f"or gradient norm and was skipped: the weights were never "
                             f"updated. Lower --lr or check the data.")

    def _any_rank_signalled(self) -> bool:
        return self.dist.sum(float(self.stop.name is not None)).item() > 0

    def save_due(self, step: int) -> bool:
        cfg = self.cfg
        self.signalled = self._any_rank_signalled()
        return bool((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps
                    or (self.signalled and cfg.save_on_signal))

    def saved(self, step: int):
        self.last_saved = step
        if not self.signalled:  # a signal during the write: stop now, not after one more step
            self.signalled = self._any_rank_signalled()

    def stop_if_signalled(self, step: int, argv: list):
        if self.signalled and step < self.cfg.steps:
            name = self.stop.name or "SIGTERM"  # the signal reached another rank
            raise Stopped(name, stopped_after(step, self.last_saved, self.cfg.out, name, argv))


def stopped_after(step: int, saved: int, out: str, name: str, argv: list) -> str:
    """The message of a run stopped by a signal after `step`, with the command that resumes
    it (`argv`: this one, which had `saved` as its newest checkpoint)."""
    resume = shlex.join(a for a in argv if a not in ("--resume", "--overwrite"))  # pastes as is
    return (f"stopped after step {step} ({name}); "
            + (f"the newest checkpoint is step {saved} in {out}" if saved
               else "no checkpoint was written")
            + f"; continue with: python {resume} --resume"
            + ("" if saved == step else " (steps after the checkpoint are redone; "
               "--save-on-signal checkpoints the last one)"))


def read_jsonl(path: str, warn=print) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl). A torn LAST line (what a full disk or
    a killed process leaves) is dropped with one warning; a bad line anywhere else is an
    error naming the file and line (ValueError)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    rows, numbered = [], [(i + 1, s) for i, s in enumerate(lines) if s.strip()]
    for k, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(numbered) - 1:  # torn by a crash or a full disk: that step is redone
                warn(f"warning: {path}: line {n} is incomplete ({str(e)[:60]}); ignored")
                break
            raise ValueError(f"{path}: line {n} is not a JSON object ({str(e)[:80]})") from None
        rows.append(row)
    return rows


def start_metrics_log(path: str, start: int):
    """metrics.jsonl for a run starting after step `start`: on resume, the lines of steps after
    the checkpoint are dropped (they will be redone), and so is a torn last line. Replaced
    atomically: never half-written."""
    keep = []
    if start and os.path.exists(path):
        try:
            keep = [r for r in read_jsonl(path) if r.get("step", 0) <= start]
        except ValueError as e:
            raise SystemExit(f"--resume: {e}; the checkpoints are intact: move the file away "
                             f"to resume without it") from None
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def free_gib(path: str) -> float:
    """Free space (GiB) of the filesystem holding `path` or its nearest existing parent."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free / 2**30


@contextlib.contextmanager
def writing(directory: str, what: str, intact: str = ""):
    """A failed write inside (disk full, permissions, a vanished directory) ends the run with
    one message naming the directory and its free space, never a traceback. `intact`: what the
    message can promise was not lost. Writers that do not raise OSError for a full disk
    (safetensors, torch.save) are translated by checkpoint.py."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"error: could not write {what} in {directory} "
                         f"({e.strerror or e}); {free_gib(directory):.2f} GiB free there. "
                         f"{intact or 'Files written before are intact'}; free space and "
                         f"continue with --resume.") from None


@contextlib.contextmanager
def file_lock(path: str, waiting: str = ""):
    """Hold an exclusive lock on `path` (created if needed), waiting for another holder (and
    printing `waiting` while it does)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Stopped(Exception):
    """The run ends because of a stop signal; `status` is the exit status that says so."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name, self.message = name, message

    @property
    def status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C): what a shell and a
        scheduler report for a process ended by that signal, so a preempted run reads as
        preempted, not as a failure (1) or a success (0)."""
        return 128 + signal.Signals[self.name].value


class StopSignals:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C). During a training step they set
    a flag that the loop reads between steps, so a step is never cut in half and a checkpoint
    never holds a half-updated model. Inside `now()` (the warm start, an evaluation: work with
    no state worth a scheduler's grace period) they stop at once, raising `Stopped`. A second
    Ctrl-C always stops at once."""

    def __init__(self):
        self.name = None
        self._old = {}
        self._now = 0

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def _handle(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user means it
        self.name = signal.Signals(signum).name
        if self._now:
            raise Stopped(self.name, f"{self.name}: stopped")
        print(f"\n{self.name}: stopping after the step in progress (Ctrl-C again to stop now)",
              flush=True)

    @contextlib.contextmanager
    def now(self, what: str = ""):
        """Inside, a signal raises Stopped at once, its message naming `what` was cut short."""
        if self.name is not None:
            raise Stopped(self.name, f"{self.name}: stopped before {what}")
        self._now += 1
        try:
            yield
        except Stopped as e:
            raise Stopped(e.name, f"{e.name}: stopped during {what}") from None
        finally:
            self._now -= 1

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def log_line(step, total, metrics, t_start, label=""):
    """The console line of a step: a progress bar, the main metrics, the step time and ETA."""
    done = int(20 * step / max(total, 1))
    eta = (time.time() - t_start) / max(step, 1) * (total - step)
    keys = ("reward_mean", "loss", "grad_norm", "param_displacement", "entropy",
            "response_len_mean", "rlsd_lambda", "rlsd_weight_clip_frac", "distilled_frac", "kl",
            "teacher_kl", "test_acc", "ood_acc")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    print(f"{label}[{'#' * done}{'.' * (20 - done)}] {step}/{total} | " + " | ".join(parts)
          + f" | {metrics.get('step_time_s', 0):.2f}s/step eta {eta / 60:.1f}m", flush=True)


@contextlib.contextmanager
def exits(out: str):
    """How a run ends, for a shell or a scheduler: bad input is one line naming the file and
    row and exit status 2, never a traceback; a stop signal 128 + its number (143 SIGTERM,
    130 Ctrl-C: preempted, not failed), with the command that continues; a second Ctrl-C
    stops at once, the checkpoints intact."""
    import data
    try:
        yield
    except (data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Stopped as e:
        print(e.message if "after step" in e.message else
              f"{e.message}; no training step was cut short: run the same command again"
              + (" with --resume" if latest_checkpoint(out) else ""), file=sys.stderr)
        raise SystemExit(e.status)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, mid-step
        print(f"\ninterrupted; the checkpoints in {out} are intact: continue with --resume",
              file=sys.stderr)
        raise SystemExit(130)
