"""Tasks, prompts, privileged contexts, verifiers and dataset loaders.

Every example carries the question and every privileged context an algorithm may show its
teacher (never the student):
  answer     the final answer                         RLSD's teacher
  solution   a full reference solution                OPSD's teacher
  hint       an answer-free hint                      PTD-PO's teacher
  rationale  an answer-free explanation               OmniOPSD-style OPSD
SDPO and SRPO build their teacher context at run time from a correct sibling rollout.

The embedded toy task makes every algorithm runnable offline on a laptop: left-to-right
chains of single-digit additions and subtractions, e.g. "7+5-3" -> "7+5=12;12-3=9", answer 9.
Train and test use 2-3 operations, the out-of-distribution split 4. Problems are assigned to
splits by a hash, so test questions never occur in training.
"""
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

import torch

COLUMNS = ("prompt", "answer", "solution", "hint", "rationale", "images")
CONTEXTS = ("answer", "solution", "hint", "rationale")


@dataclass
class Example:
    prompt: str
    answer: str
    solution: str = ""
    hint: str = ""
    rationale: str = ""
    images: list = field(default_factory=list)
    where: str = ""  # "file:line" of the row, for error messages


class DataError(ValueError):
    """Bad input data; the message names the file and line or field."""


# ----------------------------------------------------------------------------------------
# The toy task
# ----------------------------------------------------------------------------------------

TOY_CHARS = "0123456789+-=;\nQASHR:adsubt,"
_WORDS = {"+": "add", "-": "sub"}
MAX_OPERAND = 99


def _toy_split_of(question: str) -> str:
    h = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "train"


def toy_example(rng: random.Random, n_ops: int) -> Example:
    nums = [rng.randint(0, MAX_OPERAND) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-") for _ in range(n_ops)]
    question = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:]))
    value, steps = nums[0], []
    for o, n in zip(ops, nums[1:]):
        new = value + n if o == "+" else value - n
        steps.append(f"{value}{o}{n}={new}")
        value = new
    return Example(prompt=question, answer=str(value), solution=";".join(steps),
                   hint=steps[0] if n_ops > 1 else "",
                   rationale=",".join(_WORDS[o] for o in ops))


def make_toy(split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n toy problems of a split: 'train', 'test' (2-3 operations) or 'ood' (4 operations)."""
    if split not in ("train", "test", "ood"):
        raise DataError(f"toy split must be train, test or ood, got {split!r}")
    rng = random.Random(f"toy-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        ex = toy_example(rng, 4 if split == "ood" else rng.choice((2, 3)))
        if split != "ood" and _toy_split_of(ex.prompt) != split:
            continue
        if split == "test" and ex.prompt in seen:  # a fixed test set of distinct questions
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------
# Prompts: what the student sees, and what each teacher sees in addition
# ----------------------------------------------------------------------------------------

# The toy tokenizer is character level, so its templates are compact.
TOY_TEMPLATES = {
    "student": "Q{prompt}",
    "answer": "Q{prompt}\nA{answer}",
    "solution": "Q{prompt}\nS{solution}",
    "hint": "Q{prompt}\nH{hint}",
    "rationale": "Q{prompt}\nR{rationale}",
    "sibling": "Q{prompt}\nS{sibling}",
}

# Real data: the wording of each paper's released teacher prompt (paraphrased minimally).
PAPER_TEMPLATES = {
    "student": "{prompt}",
    # RLSD teacher_hint_self_distill.jinja: the answer as a "reference solution"
    "answer": "{prompt}\n\nHere is a reference solution:\n{answer}\n\n"
              "After understanding the reference solution, solve the problem with your own approach.",
    # OPSD data_collator.py
    "solution": "{prompt}\n\nHere is a reference solution to this problem:\n"
                "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
                "After understanding the reference solution, please try to solve this problem "
                "using your own approach below.",
    # PTD-PO: question + "\n\n" + structured hint
    "hint": "{prompt}\n\n{hint}",
    "rationale": "{prompt}\n\nHere is a rationale for this problem:\n{rationale}",
    # SDPO actor.yaml reprompt_template / solution_template (YAML `|-`: no final newline)
    "sibling": "{prompt}\nCorrect solution:\n\n{sibling}\n\nCorrectly solve the original question.",
}

# Phrases that only privileged prompts contain: a response that says them has leaked.
LEAK_PHRASES = ("reference solution", "the hint", "the answer is given", "correct solution:")
TOY_LEAK_MARKERS = ("Q", "A", "S", "H", "R")  # toy privileged-context markers


def templates(data_spec: str) -> dict:
    """The toy task's compact templates, or the papers' wording for real data."""
    return TOY_TEMPLATES if data_spec == "toy" else PAPER_TEMPLATES


def render(template: str, ex: Example, sibling: str = "") -> str:
    return template.format(prompt=ex.prompt, answer=ex.answer, solution=ex.solution,
                           hint=ex.hint, rationale=ex.rationale, sibling=sibling)


def prompt_ids(tokenizer, text: str, **template_kwargs) -> list[int]:
    """Token ids of one user message through the model's chat template, ready to generate."""
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------
# Verifiers: response text -> reward
# ----------------------------------------------------------------------------------------

_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer


def extract_answer(text: str) -> str | None:
    """Final answer of a response: \\boxed{}, then <answer> tags, then GSM8K ####, then the
    last number. None if nothing answer-like is present."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tags = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if tags:
        return tags[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    nums = re.findall(_NUM, text)
    return nums[-1] if nums else None


def parse_number(s: str) -> Fraction | None:
    """Integers, decimals, fractions (3/4, \\frac{3}{4}), thousands commas, $ and %."""
    s = s.strip().rstrip(".").replace("$", "").replace("%", "").replace(",", "").replace(" ", "")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _choice(s: str) -> str | None:
    m = re.fullmatch(r"\(?([A-Ea-e])\)?[.:]?(?:\s.*)?", s.strip(), flags=re.S)
    return m.group(1).upper() if m else None


def is_correct(response: str, answer: str) -> bool:
    """Does the response's final answer match `answer`? Numbers compare by value, single
    letters A-E as multiple choice, anything else as normalised text."""
    pred = extract_answer(response)
    if pred is None:
        return False
    gold_choice = _choice(answer) if len(answer.strip()) <= 3 else None
    if gold_choice and not re.fullmatch(_NUM, answer.strip()):
        return _choice(pred) == gold_choice
    gold_num, pred_num = parse_number(answer), parse_number(pred)
    if gold_num is not None:
        return pred_num is not None and pred_num == gold_num
    return " ".join(pred.split()).lower() == " ".join(answer.split()).lower()


def reward(response: str, answer: str) -> float:
    """Binary verifiable reward (RLSD Eq. 1)."""
    return float(is_correct(response, answer))


# ----------------------------------------------------------------------------------------
# Loaders: JSONL and Parquet files, or the toy task
# ----------------------------------------------------------------------------------------

def _text_lines(path: str) -> list[str]:
    """The file's lines as text: UTF-8 with or without a byte-order mark (files exported on
    Windows have one), LF or CRLF line ends. Undecodable bytes name the line they are on."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: not valid UTF-8 (byte {line[e.start]:#04x} at "
                            f"column {e.start + 1}); save the file as UTF-8") from None
    return out


DATA_FORMATS = ".jsonl (one JSON object per line), .json (an array of objects), " \
               ".csv (a header row), .parquet"


def _rows(path: str):
    """(location, dict) pairs; the location names the file and line for error messages."""
    if path.endswith(".jsonl"):
        yield from _jsonl_rows(path)
    elif path.endswith(".json"):
        text = "\n".join(_text_lines(path))
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("{"):  # JSON lines in a file named .json
                yield from _jsonl_rows(path)
                return
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects (or one object per line)")
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object")
            yield f"{path}: item {i}", row
    elif path.endswith(".csv"):
        import csv
        lines = _text_lines(path)
        reader = csv.DictReader(lines)
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(f"{path}:{reader.line_num}: more cells than the header has")
                yield f"{path}:{reader.line_num}", row
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install -e '.[parquet]'") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield f"{path}: row {i}", row
    else:
        raise DataError(f"{path}: unknown data format; accepted: {DATA_FORMATS}")


def _jsonl_rows(path: str):
    for i, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object")
        yield f"{path}:{i}", row


def load_examples(path: str, *, columns: dict | None = None, need: tuple = ()) -> list[Example]:
    """Examples from a .jsonl or .parquet file. `columns` renames fields (Example field ->
    file column); `need` lists privileged contexts that must be present on every row."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file ({DATA_FORMATS})")
    col = {c: (columns or {}).get(c) or c for c in COLUMNS}
    out = []
    for where, row in _rows(path):
        for name in ("prompt", "answer") + tuple(need):
            value = row.get(col[name])
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where}: missing or empty '{col[name]}' "
                                f"(needed as the {name})")
        fields = {c: row.get(col[c]) for c in CONTEXTS}
        images = row.get(col["images"]) or []
        images = [images] if isinstance(images, str) else list(images)
        base = os.path.dirname(os.path.abspath(path))  # relative image paths: next to the file
        out.append(Example(prompt=str(row[col["prompt"]]),
                           **{c: "" if v is None else str(v) for c, v in fields.items()},
                           images=[os.path.join(base, i) for i in images], where=where))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def drop_long_prompts(examples, tokenizer, template: str, limit: int, policy: str, *,
                      source: str = "", verbose: bool = True,
                      limit_name: str = "--max-prompt-tokens") -> list[Example]:
    """Prompts longer than `limit` tokens: policy 'fail' names the row, 'skip' drops and counts."""
    keep = []
    for e in examples:
        n = len(prompt_ids(tokenizer, render(template, e)))
        if n <= limit:
            keep.append(e)
        elif policy == "fail":
            raise DataError(f"{e.where or source}: prompt has {n} tokens, more than "
                            f"{limit_name} {limit} (--long-prompts skip drops such rows)")
    if verbose and len(keep) < len(examples):
        print(f"skipped {len(examples) - len(keep)} of {len(examples)} prompts longer than "
              f"{limit} tokens", flush=True)
    if not keep:
        raise DataError(f"{source}: every prompt is longer than {limit_name} {limit}")
    return keep


def check_images(examples: list[Example]):
    """Every image a row names must exist and decode, before any training starts."""
    rows = [e for e in examples if e.images]
    if not rows:
        return
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{rows[0].where}: rows have images; reading them needs pillow "
                        f"(pip install -e '.[vision]')") from None
    for e in rows:
        for p in e.images:
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as err:  # PIL raises many types for a bad file
                raise DataError(f"{e.where}: image {p} cannot be read "
                                f"({type(err).__name__}: {err})") from None


def step_examples(examples: list, step: int, *, prompts_per_step: int, seed: int,
                  rank: int = 0, world: int = 1) -> list:
    """This rank's prompts for optimizer step `step` (from 1): a function of (seed, step) alone,
    so resuming needs no data pointer. The stream is a fresh permutation of `examples` per
    epoch; rank r takes every world-th prompt of the step, so the ranks together see
    `prompts_per_step` distinct prompts."""
    P, n = prompts_per_step, len(examples)
    perms, out = {}, []
    for pos in range((step - 1) * P + rank, step * P, world):
        epoch = pos // n
        if epoch not in perms:  # seed * 7919 + epoch: one generator per (seed, epoch < 7919)
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
                seed * 7919 + epoch))
        out.append(examples[perms[epoch][pos % n]])
    return out


def load_data(spec: str, split: str, *, n_toy: int, seed: int = 0, columns=None,
              need=()) -> list[Example]:
    """'toy' (generated) or a file path."""
    if spec == "toy":
        return make_toy(split, n_toy, seed=seed)
    examples = load_examples(spec, columns=columns, need=need)
    check_images(examples)
    return examples
