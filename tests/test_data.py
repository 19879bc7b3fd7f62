"""data.py: the toy task, verifiers and loaders, including every bad-input message."""
import json

import pytest

import data
from engine.toy import arithmetic
from engine import prompts


def test_toy_examples_are_consistent_and_deterministic():
    a, b = arithmetic.make_toy("train", 50), arithmetic.make_toy("train", 50)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    for e in a + arithmetic.make_toy("ood", 20):
        value = eval(e.prompt)  # left to right with + and - is ordinary evaluation
        assert e.answer == str(value)
        assert e.solution.split(";")[-1].endswith("=" + e.answer)
        assert e.hint == e.solution.split(";")[0] and e.answer not in e.rationale
        assert data.reward(e.solution, e.answer) == 1.0


def test_toy_splits():
    train = {e.prompt for e in arithmetic.make_toy("train", 3000)}
    test = arithmetic.make_toy("test", 200)
    assert len({e.prompt for e in test}) == 200 and not train & {e.prompt for e in test}
    assert all(e.prompt.count("+") + e.prompt.count("-") == 4 for e in arithmetic.make_toy("ood", 30))
    with pytest.raises(data.DataError, match="split"):
        arithmetic.make_toy("valid", 3)


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{a{b}c} and \\boxed{7}", "7"),
    ("<answer> 42 </answer>", "42"),
    ("work... #### 1,234", "1,234"),
    ("3+4=7;7-10=-3", "-3"),
    ("no numbers here", None),
    ("\\boxed{unbalanced", None),
])
def test_extract_answer(text, expected):
    assert data.extract_answer(text) == expected


@pytest.mark.parametrize("response,answer,ok", [
    ("#### 1,000", "1000", True),
    ("\\boxed{0.5}", "1/2", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("the answer is 12.", "12", True),
    ("<answer>$5</answer>", "5", True),
    ("<answer>-3</answer>", "3", False),
    ("<answer>(B)</answer>", "B", True),
    ("<answer>B. because</answer>", "B", True),
    ("<answer>C</answer>", "B", False),
    ("\\boxed{Paris}", "paris", True),
    ("", "1", False),
])
def test_is_correct(response, answer, ok):
    assert data.is_correct(response, answer) is ok


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_jsonl_with_renamed_columns(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1", "a": 2, "hint": "add"}, "",
                                           {"q": "2+2", "a": "4", "images": "x.png"}])
    exs = data.load_examples(f, columns={"prompt": "q", "answer": "a"})
    assert [(e.prompt, e.answer, e.hint) for e in exs] == [("1+1", "2", "add"), ("2+2", "4", "")]
    assert exs[1].images == [str(tmp_path / "x.png")]  # relative to the data file
    assert exs[0].where.endswith("d.jsonl:1") and exs[1].where.endswith("d.jsonl:3")


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    f = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["1+2", "5-1"], "answer": ["3", "4"],
                             "solution": ["1+2=3", "5-1=4"]}), f)
    exs = data.load_examples(f, need=("solution",))
    assert [(e.prompt, e.answer, e.solution) for e in exs] == [("1+2", "3", "1+2=3"),
                                                               ("5-1", "4", "5-1=4")]
    pq.write_table(pa.table({"prompt": ["1+2"], "answer": [None]}), f)
    with pytest.raises(data.DataError, match=r"d\.parquet: row 1: missing or empty 'answer'"):
        data.load_examples(f)


@pytest.mark.parametrize("rows,need,message", [
    (['{"prompt": "x", "answer": "1"}', '{"prompt": "y", "answer": '], (),
     r"d\.jsonl:2: malformed JSON"),
    (['[1, 2]'], (), r"d\.jsonl:1: expected a JSON object"),
    ([{"prompt": "x", "answer": "1"}, {"prompt": "y"}], (), r"d\.jsonl:2: missing or empty 'answer'"),
    ([{"prompt": "  ", "answer": "1"}], (), r"d\.jsonl:1: missing or empty 'prompt'"),
    ([{"prompt": "x", "answer": "1"}], ("solution",),
     r"d\.jsonl:1: missing or empty 'solution' \(needed as the solution\)"),
    ([{"prompt": "x", "answer": "1", "hint": ""}], ("hint",), r"d\.jsonl:1: .*'hint'"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, rows, need, message):
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data.DataError, match=message):
        data.load_examples(f, need=need)


def test_bad_paths(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("a,b\n")
    with pytest.raises(data.DataError, match="unknown data format; accepted: .jsonl"):
        data.load_examples(str(tmp_path / "d.txt"))
    with pytest.raises(data.DataError, match="is a directory"):
        data.load_examples(str(tmp_path))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="no rows"):
        data.load_examples(str(tmp_path / "e.jsonl"))


def test_render_keeps_privileged_context_out_of_the_student_prompt():
    e = arithmetic.make_toy("train", 1)[0]
    student = prompts.render(prompts.TOY_TEMPLATES["student"], e)
    for kind in data.CONTEXTS:
        assert getattr(e, kind) in prompts.render(prompts.TOY_TEMPLATES[kind], e)
    assert e.solution not in student and e.rationale not in student
    paper = prompts.render(prompts.PAPER_TEMPLATES["rationale"], e)
    assert e.rationale in paper and e.rationale not in prompts.render(prompts.PAPER_TEMPLATES["student"], e)


@pytest.mark.parametrize("name,raw", [
    ("bom_crlf.jsonl", b'\xef\xbb\xbf{"prompt": "1+1", "answer": "2"}\r\n{"prompt": "2+2", "answer": 4}\r\n'),
    ("array.json", b'[{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": 4}]'),
    ("lines.json", b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": 4}\n'),
    ("table.csv", b'\xef\xbb\xbfprompt,answer\r\n"1+1",2\r\n2+2,4\r\n'),
])
def test_common_file_shapes_load_alike(tmp_path, name, raw):
    f = tmp_path / name
    f.write_bytes(raw)
    assert [(e.prompt, e.answer) for e in data.load_examples(str(f))] == [("1+1", "2"), ("2+2", "4")]


@pytest.mark.parametrize("name,raw,message", [
    ("bad.jsonl", b'{"prompt": "1", "answer": "1"}\n{"prompt": "\xff\xfe", "answer": "1"}\n',
     r"bad\.jsonl:2: not valid UTF-8"),
    ("bad.csv", b'prompt,answer\n1+1,2\n\xff,3\n', r"bad\.csv:3: not valid UTF-8"),
    ("bad.csv", b'prompt,answer\n1+1,2,9\n', r"bad\.csv:2: more cells than the header"),
    ("bad.json", b'[{"prompt": "1+1", "answer": "2"},\n 3]', r"bad\.json: item 2: expected a JSON object"),
    ("bad.json", b'[{"prompt": "1+1",\n "answer": }]', r"bad\.json:2: malformed JSON"),
    ("bad.parquet", b"PAR1 not really", r"bad\.parquet: not a readable Parquet file"),
])
def test_bad_files_give_one_message(tmp_path, name, raw, message):
    f = tmp_path / name
    f.write_bytes(raw)
    with pytest.raises(data.DataError, match=message):
        data.load_examples(str(f))


def test_sdpo_reprompt_and_thinking_removal_are_the_official_ones():
    from engine import batch
    e = data.Example(prompt="What is 2+2?", answer="4")
    assert prompts.render(prompts.PAPER_TEMPLATES["sibling"], e, sibling="It is 4.") == (
        "What is 2+2?\nCorrect solution:\n\nIt is 4.\n\nCorrectly solve the original question.")
    # re.sub(r'<think>.*?</think>\s*', '', text): text before the block is kept
    assert batch.strip_thinking("Sure. <think>a\nb</think>\n\nThe answer is 4.") == (
        "Sure. The answer is 4.")
    assert batch.strip_thinking("no block") == "no block"
