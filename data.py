"""Tasks, privileged contexts, verifiers and dataset loaders (the prompts are prompts.py's).

Every example carries the question and every privileged context an algorithm may show its
teacher (never the student):
  answer     the final answer                         RLSD's teacher
  solution   a full reference solution                OPSD's teacher
  hint       an answer-free hint                      PTD-PO's teacher
  rationale  an answer-free explanation               OmniOPSD-style OPSD
SDPO and SRPO build their teacher context at run time from a correct sibling rollout.

The embedded toy task makes every algorithm runnable offline on a laptop: left-to-right
chains of additions and subtractions of numbers 0-99, e.g. "36+78-11" -> "36+78=114;114-11=103",
answer 103. Train and test use 2-3 operations, the out-of-distribution split 4. Problems are
assigned to splits by a hash, so test questions never occur in training. Its image
counterpart, `--data shapes` (count the shapes of a colour in a picture), is in shapes.py.

The warm start imitates a sloppy demonstrator (`sloppy_solution`, --demo-slip): shown
only the question, it drops most carries and borrows ("36+78=104"); shown a privileged context
it works carefully. SFT alone therefore leaves a student whose habit is to slip although it
can carry, which only a reward can correct, and a teacher shown the answer that knows where
the slips are: imperfect demonstrations, the situation RLVR usually starts from.
"""
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

import torch

COLUMNS = ("prompt", "answer", "solution", "hint", "rationale", "teacher_prompt", "images")
CONTEXTS = ("answer", "solution", "hint", "rationale")


@dataclass
class Example:
    prompt: str
    answer: str
    solution: str = ""
    hint: str = ""
    rationale: str = ""
    teacher_prompt: str = ""  # a whole teacher prompt given by the data (PTD-PO prompt_with_hint)
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


def _images(cell, base: str, where: str, name: str) -> list:
    """A row's images: one or a list of file paths (relative to the data file), encoded bytes,
    or {"bytes": ..., "path": ...} structs (a Hugging Face datasets Image column in Parquet)."""
    if cell is None or (isinstance(cell, (str, bytes, list, tuple)) and not cell):
        return []
    out = []
    for item in (cell if isinstance(cell, (list, tuple)) else [cell]):
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, str) and item:
            out.append(os.path.join(base, item))
        else:
            raise DataError(f"{where}: '{name}' must hold image paths or image bytes, "
                            f"got {type(item).__name__}")
    return out


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
        fields = {c: row.get(col[c]) for c in CONTEXTS + ("teacher_prompt",)}
        base = os.path.dirname(os.path.abspath(path))  # relative image paths: next to the file
        out.append(Example(prompt=str(row[col["prompt"]]),
                           **{c: "" if v is None else str(v) for c, v in fields.items()},
                           images=_images(row.get(col["images"]), base, where, col["images"]),
                           where=where))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def drop_long_prompts(examples, encode, limit: int, policy: str, *, source: str = "",
                      verbose: bool = True, limit_name: str = "--max-prompt-tokens") -> list[Example]:
    """Prompts longer than `limit` tokens (`encode(example)` -> the student's prompt ids):
    policy 'fail' names the row, 'skip' drops and counts."""
    keep = []
    for e in examples:
        n = len(encode(e))
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
        import PIL  # noqa: F401  (vision.open_image reads them with pillow)
    except ImportError:
        raise DataError(f"{rows[0].where}: rows have images; reading them needs pillow "
                        f"(pip install -e '.[vision]')") from None
    import vision
    for e in rows:
        for k, p in enumerate(e.images, 1):
            try:
                with vision.open_image(p) as im:
                    im.verify()
            except Exception as err:  # PIL raises many types for a bad file
                name = f"image {k} (bytes)" if isinstance(p, bytes) else f"image {p}"
                raise DataError(f"{e.where}: {name} cannot be read "
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


TASKS = ("toy", "shapes")  # the embedded tasks: arithmetic (text), shapes (images, shapes.py)


def make_task(spec: str, split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n generated problems of an embedded task's split."""
    if spec == "shapes":
        import shapes
        return shapes.make_shapes(split, n, seed=seed)
    return make_toy(split, n, seed=seed)


def load_data(spec: str, split: str, *, n_toy: int, seed: int = 0, columns=None,
              need=()) -> list[Example]:
    """An embedded task ('toy', 'shapes': generated) or a file path."""
    if spec in TASKS:
        return make_task(spec, split, n_toy, seed=seed)
    examples = load_examples(spec, columns=columns, need=need)
    check_images(examples)
    return examples
