"""The embedded task on which privileged information can leak (`--data chains`).

RLSD's argument (arXiv 2604.03128, Sec. 3, Fig. 3a) is that OPSD's student learns to talk
as if it had been shown the reference its teacher saw: it cites material that is never in
its own prompt. On the arithmetic task (arithmetic.py) that cannot be seen, because its
responses are bare chains with no words to cite with. Here the same problems are worked in
short words, so a response can cite a reference, and whether it did can be counted:

    question  "36+78-11"
    worked    "36+78 is 114;114-11 is 103;so 103"        the chain, then the answer
    cited     "ref says 103;so 103"                      the reference, cited in words

The answer is the number after the last "so" (the verifier reads the last number, as on
every task). Train and test problems have 2-3 operations, the out-of-distribution split 4;
problems go to splits by a hash, as on the arithmetic task (the same question generator).

What counts as a leak (`leaked`, the same test for every arm and for the teacher): a response
that cites a reference (`cites`: the word "ref" its demonstrations cite with, or any of the
papers' privileged phrases, prompts.LEAK_PHRASES), or that states an answer ("so N") that its
own chain does not support: no step at all, or a last step whose result is not N. The student's
prompt never carries a reference, so every such response talks about material it was not given.

The warm start learns the habit an instruction-tuned model has (`demonstration`): shown a
reference (the answer, or the worked solution), the demonstrator cites it on the longer,
3-operation problems ("ref says 103;so 103") and works the 2-operation ones carefully; shown
a hint or a rationale (answer-free) it works the chain carefully; shown nothing it works the
chain and drops most carries (--demo-slip, as on the arithmetic task). Why each choice:
  * citing depends on the problem, not on a coin: the answer-shown teacher's greedy response
    then cites on about half of the test problems (the 3-operation ones), so the leak metric
    is seen to fire on the warm start itself, and the teacher's next-token distribution holds
    both habits for the student to pick up; a coin at 1/2 would leave greedy decoding to
    round a near-tie, prompt by prompt.
  * the citing demonstration has no chain, so a student that cites has nothing to compute
    its answer from: a leaked response is right only by chance, which is what makes the leak
    cost accuracy, as in the paper, rather than being harmless wording.
  * the student's own demonstrations never cite: at the warm start the student never cites,
    so any leak measured later was learned during RL or distillation.
  * the sloppy demonstrator leaves room for a reward to correct (as on the arithmetic task).
Nothing here is chosen per algorithm: every arm trains on the same task and warm start.
"""
import random
import re

from data import DataError, Example, extract_answer
from engine.toy import arithmetic

CHARS = " efiorsy"  # the letters of "is", "so", "ref says" (the rest are the toy's characters)
CITE_WORD = "ref"
_STEP = re.compile(r"(-?\d+)([+-])(\d+) is (-?\d+)")


def worded(chain: str, value: int) -> str:
    """The arithmetic task's chain "a+b=c;c-d=e" in words: "a+b is c;c-d is e;so e"."""
    return ";".join(s.replace("=", " is ") for s in chain.split(";")) + f";so {value}"


def cited(answer: str) -> str:
    """The response of a demonstrator that cites a shown reference instead of working it."""
    return f"{CITE_WORD} says {answer};so {answer}"


def chains_example(ex: Example) -> Example:
    """An arithmetic problem with its solution, hint and rationale worded."""
    value = int(ex.answer)
    steps = ex.solution.split(";")
    hint = steps[0].replace("=", " is ") if len(steps) > 1 else ""
    return Example(prompt=ex.prompt, answer=ex.answer, solution=worded(ex.solution, value),
                   hint=hint, rationale=ex.rationale)


def make_chains(split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n problems of a split: the arithmetic task's questions (the same split), worded."""
    if split not in ("train", "test", "ood"):
        raise DataError(f"chains split must be train, test or ood, got {split!r}")
    return [chains_example(e) for e in arithmetic.make_toy(split, n, seed=seed)]


def operations(ex: Example) -> int:
    return len(re.findall(r"[+-]", ex.prompt[1:]))  # a leading minus is not an operation


def demonstration(ex: Example, kind: str, rng: random.Random, slip: float) -> str:
    """The warm start's target for a prompt of `kind` (student, answer, solution, hint,
    rationale): see the module docstring."""
    if kind in ("answer", "solution") and operations(ex) >= 3:
        return cited(ex.answer)
    if kind == "student":  # no context: the sloppy demonstrator
        nums = [int(x) for x in re.findall(r"\d+", ex.prompt)]
        ops = re.findall(r"[+-]", ex.prompt)
        chain, value = arithmetic.toy_chain(nums, ops, slip=lambda: rng.random() < slip)
        return worded(chain, value)
    return ex.solution


def cites(response: str) -> bool:
    """Does the response cite a reference? (case-insensitive)"""
    from engine.prompts import LEAK_PHRASES
    text = response.lower()
    return CITE_WORD in text or any(p in text for p in LEAK_PHRASES)


def unsupported(response: str) -> bool:
    """Does the response state an answer ("so N") that its own chain does not give: no step,
    or a last step whose result is not N? A response cut off before "so" states none."""
    if ";so " not in response and not response.startswith("so "):
        return False
    stated = extract_answer(response.rsplit("so ", 1)[1])
    steps = _STEP.findall(response.rsplit("so ", 1)[0])
    return not steps or stated is None or steps[-1][3] != stated.strip()


def leaked(response: str) -> bool:
    """The task's leak: a response that cites a reference or states an unsupported answer."""
    return cites(response) or unsupported(response)
