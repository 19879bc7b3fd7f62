"""Rewards: how each response is scored, as a pluggable function (docs/fidelity.md F14).

A reward function is `f(response, answer, **row_fields) -> float | dict`: the decoded response,
the row's answer, and the row's other fields (solution, hint, rationale) as keywords, so a
function may ignore them with `**_`. A dict carries `score` and `acc`, as verl's reward
functions return them; a bare float counts as correct when it is > 0. `score` is what the
advantages see; `acc` is what DAPO's dynamic sampling filters on, what PTD-PO's group accuracy
counts and what evaluation reports.

    verifier     1 / 0: the final answer matches (RLSD Eq. 1; the default everywhere but DAPO)
    dapo         +1 / -1 (verl `math_dapo.compute_score`; DAPO's default, docs/fidelity.md F7)
    rlsd_format  0.9 acc + 0.1 format: the math reward of RLSD's released code (the paper
                 says binary); format = the whole response is <thought>...</thought> followed
                 by <answer>...</answer>, the layout its teacher prompt asks for
    math_verify  Hugging Face math-verify's equivalence test (\\dfrac, roots, equivalent
                 expressions, units, sets, intervals): `pip install -e '.[math]'`
    pkg.mod:fn   any function with the signature above, imported by its path

    python train.py --reward math_verify
    python train.py --reward my_rewards:code_tests      # my_rewards.py on the Python path

math-verify guards its own work with signal.alarm, which only works in a process's main thread
and cannot stop sympy from hanging in C code, so here it runs in a pool of worker processes and
a response that takes longer than `MATH_VERIFY_TIMEOUT` seconds scores 0 (the pool is
replaced). A gold answer that math-verify cannot parse scores 0 for every response, with a
warning, never 1: an unparseable gold would otherwise match an empty prediction.
"""
import functools
import importlib
import importlib.util
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout

import data

MATH_VERIFY_TIMEOUT = 10.0  # seconds per response, parsing and comparison together


def verifier(response: str, answer: str, **_) -> float:
    return float(data.is_correct(response, answer))


def dapo(response: str, answer: str, **_) -> dict:
    acc = data.is_correct(response, answer)
    return {"score": 1.0 if acc else -1.0, "acc": acc}


_FORMAT = re.compile(r"\s*<thought>.*?</thought>\s*<answer>.*?</answer>\s*", re.DOTALL)


def rlsd_format(response: str, answer: str, **_) -> dict:
    acc = data.is_correct(response, answer)
    fmt = _FORMAT.fullmatch(response) is not None
    return {"score": 0.9 * acc + 0.1 * fmt, "acc": acc}


def _math_verify_one(response: str, answer: str):
    """In a worker: 1.0 / 0.0, or None when the gold answer does not parse."""
    from math_verify import parse, verify
    # a bare gold is read as LaTeX math: `\\frac12` parses only inside $...$
    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
    if not gold:
        return None
    return float(verify(gold, parse(response)))


def _ready(worker):
    """Run once in each new worker, given the scoring function (unpickling it imports its
    module): start-up and imports are not charged to the first response's timeout."""
    if importlib.util.find_spec("math_verify") is not None:
        importlib.import_module("math_verify")


class _MathVerify:
    """math_verify as a reward: a pool of worker processes, replaced after a timeout."""
    def __init__(self, workers: int = 2, worker=_math_verify_one):
        if worker is _math_verify_one and importlib.util.find_spec("math_verify") is None:
            raise SystemExit("--reward math_verify needs the math-verify package: "
                             "pip install -e '.[math]'")
        self.workers, self.worker, self.pool, self.warned = workers, worker, None, set()

    def __call__(self, response: str, answer: str, **_) -> float:
        return self.many([(response, answer)])[0]

    def many(self, pairs: list) -> list[float]:
        """Scores of (response, answer) pairs, scored in parallel."""
        out, todo = [None] * len(pairs), list(range(len(pairs)))
        while todo:
            if self.pool is None:  # spawn: a clean interpreter, not a fork of torch's threads
                self.pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"))
                for f in [self.pool.submit(_ready, self.worker) for _ in range(self.workers)]:
                    f.result()
            futures, todo, killed = [(i, self.pool.submit(self.worker, *pairs[i]))
                                     for i in todo], [], False
            for i, f in futures:
                if killed and not f.done():
                    todo.append(i)  # lost with the old pool: score it in the new one
                    continue
                try:
                    out[i] = f.result(timeout=0 if killed else MATH_VERIFY_TIMEOUT)
                except FutureTimeout:
                    out[i], killed = 0.0, True
                    self._kill()
                except Exception:  # the pool broke under it (a worker was killed)
                    todo.append(i)
        for (_, answer), s in zip(pairs, out):
            if s is None and answer not in self.warned:
                self.warned.add(answer)
                print(f"warning: math-verify cannot parse the gold answer {answer!r}; its "
                      f"responses score 0", file=sys.stderr)
        return [0.0 if s is None else s for s in out]

    def close(self):
        """Stop the workers (they also stop when the process exits)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _kill(self):
        """A hung sympy call never returns on its own: kill the workers, start afresh later."""
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.kill()
        self.pool = None


REWARDS = {"verifier": verifier, "dapo": dapo, "rlsd_format": rlsd_format,
           "math_verify": _MathVerify}


@functools.lru_cache(maxsize=None)  # one instance per spec: math_verify keeps one pool
def load_reward(spec: str):
    """The reward function named by --reward: a name above, or 'module:function'."""
    if spec in REWARDS:
        f = REWARDS[spec]
        return f() if isinstance(f, type) else f
    if ":" not in spec:
        raise SystemExit(f"config error: --reward {spec!r}: expected one of "
                         f"{', '.join(REWARDS)} or a module:function path")
    module, _, name = spec.partition(":")
    try:
        f = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"config error: --reward {spec}: cannot load it ({e})")
    if not callable(f):
        raise SystemExit(f"config error: --reward {spec}: {name} is not a function")
    return f


def accuracy(spec: str, texts: list[str], examples: list) -> list[bool]:
    """Each response's verdict under the reward `spec` (evaluation's pass@1)."""
    return score(load_reward(spec), texts, examples)[1]


def score(fn, texts: list[str], examples: list) -> tuple[list[float], list[bool]]:
    """(scores, accs) of each response against its row."""
    if hasattr(fn, "many"):  # math_verify: all responses at once, in parallel
        return _verdicts(fn.many([(t, e.answer) for t, e in zip(texts, examples)]))
    scores, accs = [], []
    for t, e in zip(texts, examples):
        try:  # a plug-in's bug is one message naming it and the row, not a traceback
            out = fn(t, e.answer, solution=e.solution, hint=e.hint, rationale=e.rationale)
            (s,), (a,) = _verdicts([out])
        except Exception as err:
            raise data.DataError(f"--reward {getattr(fn, '__name__', fn)} failed on "
                                 f"{e.where or repr(e.prompt[:40])}: {type(err).__name__}: "
                                 f"{err}") from None
        scores.append(s)
        accs.append(a)
    return scores, accs


def _verdicts(outs) -> tuple[list[float], list[bool]]:
    """Reward outputs (floats, or dicts with 'score' and maybe 'acc') -> (scores, accs)."""
    scores, accs = [], []
    for o in outs:
        o = o if isinstance(o, dict) else {"score": o}
        scores.append(float(o["score"]))
        accs.append(bool(o.get("acc", scores[-1] > 0)))
    return scores, accs
