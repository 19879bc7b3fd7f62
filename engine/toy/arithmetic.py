"""The embedded arithmetic task (`--data toy`) and its sloppy demonstrator.

It makes every algorithm runnable offline on a laptop: left-to-right chains of additions and
subtractions of numbers 0-99, e.g. "36+78-11" -> "36+78=114;114-11=103", answer 103. Train
and test use 2-3 operations, the out-of-distribution split 4. Problems are assigned to
splits by a hash, so test questions never occur in training. Every privileged context is
filled in: the answer, the worked chain as the solution, its first step as a hint, the
operations in words as a rationale. Its image counterpart, `--data shapes`, is shapes.py.

The warm start imitates a sloppy demonstrator (`sloppy_solution`, --demo-slip): shown only
the question, it drops most carries and borrows ("36+78=104"); shown a privileged context it
works carefully. SFT alone therefore leaves a student whose habit is to slip although it can
carry, which only a reward can correct, and a teacher shown the answer that knows where the
slips are: imperfect demonstrations, the situation RLVR usually starts from.
"""
import hashlib
import random
import re

from data import Example
from engine.toy.splits import draw_split


TOY_CHARS = "0123456789+-=;\nQASHR:adsubt,"
_WORDS = {"+": "add", "-": "sub"}
MAX_OPERAND = 99


def _toy_split_of(question: str) -> str:
    h = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "train"


def carries(value: int, op: str, n: int) -> bool:
    """Does `value op n` carry (or borrow) out of the units digit? (Python's floor digits, so
    negative values are covered too: -29 - 75 borrows because 1 < 5.)"""
    return value % 10 + n % 10 >= 10 if op == "+" else value % 10 < n % 10


def toy_chain(nums: list[int], ops: list[str], slip=None) -> tuple[str, int]:
    """(solution, answer) of a left-to-right chain. `slip()`, when given, is asked at each step
    that carries whether to drop the carry (the result is then off by 10), as a sloppy
    demonstrator does; later steps continue from the slipped value."""
    value, steps = nums[0], []
    for o, n in zip(ops, nums[1:]):
        new = value + n if o == "+" else value - n
        if slip is not None and carries(value, o, n) and slip():
            new += -10 if o == "+" else 10
        steps.append(f"{value}{o}{n}={new}")
        value = new
    return ";".join(steps), value


def toy_example(rng: random.Random, n_ops: int) -> Example:
    nums = [rng.randint(0, MAX_OPERAND) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-") for _ in range(n_ops)]
    question = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:]))
    solution, value = toy_chain(nums, ops)
    steps = solution.split(";")
    return Example(prompt=question, answer=str(value), solution=solution,
                   hint=steps[0] if n_ops > 1 else "",
                   rationale=",".join(_WORDS[o] for o in ops))


def sloppy_solution(ex: Example, rng: random.Random, p: float) -> str:
    """The toy problem worked by a sloppy demonstrator that drops each carry with probability
    p: the imperfect demonstrations the warm start imitates (warmstart.py)."""
    nums = [int(x) for x in re.findall(r"\d+", ex.prompt)]
    ops = re.findall(r"[+-]", ex.prompt)
    return toy_chain(nums, ops, slip=lambda: rng.random() < p)[0]


def make_toy(split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n toy problems of a split: 'train', 'test' (2-3 operations) or 'ood' (4 operations)."""
    return draw_split("toy", split, n, seed, key=lambda ex: ex.prompt,
                      make=lambda rng, ood: toy_example(rng, 4 if ood else rng.choice((2, 3))),
                      split_of=lambda ex: _toy_split_of(ex.prompt))
