"""Prompts (docs/fidelity.md F2, F11): the official teacher strings, chat-template options for the student
and the teacher, the system prompt, a per-row teacher prompt, and the teacher-prompt budget."""
import pytest

import data
from engine import prompts
from engine.config import parse_config
from engine.prompts import Prompts, prompts_for, render
from engine.toy.models import build_toy_tokenizer

# a chat template over the toy tokenizer's characters: role initial, ':', content, ';', then
# 'A=t' when the thinking switch is off (so the rendered prompt shows whether it got there)
TEMPLATE = ("{% for m in messages %}{{ m.role[0] }}:{{ m.content }};{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}A=t{% endif %}")


@pytest.fixture
def tok():
    t = build_toy_tokenizer()
    t.chat_template = TEMPLATE
    return t


def text(tok, ids):
    return tok.decode(ids)


def test_template_options_reach_the_student_and_the_teacher_separately(tok):
    ex = data.Example(prompt="2+3", answer="5")
    P = Prompts(prompts.TOY_TEMPLATES, student_options={"enable_thinking": False},
                teacher_options={"enable_thinking": True})
    assert text(tok, P.student(tok, ex)) == "u:Q2+3;A=t"
    assert text(tok, P.teacher(tok, ex, "answer")[0]) == "u:Q2+3\nA5;"
    P = Prompts(prompts.TOY_TEMPLATES, system="1", student_options={}, teacher_options={})
    assert text(tok, P.student(tok, ex)) == "s:1;u:Q2+3;"  # the system message comes first
    assert text(tok, P.teacher(tok, ex, "answer")[0]) == "s:1;u:Q2+3\nA5;"


def test_each_paper_default_sets_its_thinking_switches():
    real = ["--model", "org/model", "--data", "x.jsonl"]
    with pytest.raises(SystemExit):  # x.jsonl does not exist: config errors stop at paths
        parse_config(["--algo", "opsd"] + real)
    for algo, student, teacher in [("opsd", False, True), ("sdpo", False, False),
                                   ("srpo", False, False)]:
        cfg = parse_config(["--algo", algo])  # toy: the same switches, no chat template to read them
        P = prompts_for(cfg)
        assert P.student_options == {"enable_thinking": student}
        assert P.teacher_options == {"enable_thinking": teacher}
    assert prompts_for(parse_config(["--algo", "grpo"])).student_options == {}


def test_bad_template_options_are_config_errors():
    for argv, words in [(["--chat-template-kwargs", "{bad"], "not valid JSON"),
                        (["--chat-template-kwargs", "[1]"], "JSON object"),
                        (["--student-template", "{question}"], "not a template"),
                        (["--student-template", "no field"], "must contain"),
                        (["--student-template", "{prompt} {answer}"], "teacher-only")]:
        with pytest.raises(SystemExit, match=words):
            parse_config(argv)


def test_official_teacher_strings():
    ex = data.Example(prompt=" What is 2+2? ", answer="4", solution="2+2=4")
    # RLSD teacher_hint_self_distill.jinja, question and hint trimmed, no final newline
    assert render(prompts.PAPER_TEMPLATES["answer"], ex) == (
        "What is 2+2?\n\nHere is a reference solution:\n4\n\nAfter understanding the reference "
        "solution, please try to solve this problem using your own approach below. You FIRST "
        "think about the reasoning process as an internal monologue enclosed within <thought> "
        "</thought> tags. The final answer MUST be enclosed within <answer> </answer> tags.")
    # OPSD v3: "Problem:", the markers, the hardened transition, the \boxed{} instruction
    opsd = render(prompts.PAPER_TEMPLATES["solution"], ex)
    assert opsd.startswith("Problem: What is 2+2?\n\nHere is a reference solution to this "
                           "problem:\n=== Reference Solution Begin ===\n2+2=4\n=== Reference "
                           "Solution End ===\n\n\nAfter reading the reference solution above")
    assert opsd.endswith("doesn't work out:\n\nPlease reason step by step, and put your final "
                         "answer within \\boxed{}.")
    assert render(prompts.OPSD_STUDENT, ex) == (
        "Problem: What is 2+2?\n\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.")


def test_a_row_teacher_prompt_replaces_the_template(tok):
    P = Prompts(prompts.TOY_TEMPLATES)
    with_col = data.Example(prompt="2+3", answer="5", teacher_prompt="2+3\nH2+3=5")
    without = data.Example(prompt="2+3", answer="5")
    assert P.teacher(tok, with_col, "hint") == (P.ids(tok, "Q2+3\nH2+3=5"), True)
    assert P.teacher(tok, without, "hint") == (P.student(tok, without), False)  # no hint: not distilled


def test_a_row_teacher_prompt_column_loads(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "1+1", "answer": "2", "prompt_with_hint": "1+1 (add)"}\n')
    cfg = parse_config(["--algo", "ptdpo", "--data", str(f), "--prompt-key", "q",
                        "--teacher-prompt-key", "prompt_with_hint"])
    cols = {c: getattr(cfg, c + "_key") for c in data.COLUMNS}
    assert data.load_examples(str(f), columns=cols)[0].teacher_prompt == "1+1 (add)"


def test_teacher_budget_cuts_only_the_privileged_text(tok):
    ex = data.Example(prompt="2+3", answer="5", solution="2+3=5;" * 20)
    full = Prompts(prompts.TOY_TEMPLATES).teacher(tok, ex, "solution")[0]
    cut, has = Prompts(prompts.TOY_TEMPLATES, max_teacher_tokens=30).teacher(tok, ex, "solution")
    assert len(full) > 30 and len(cut) <= 30 and has
    assert text(tok, cut).startswith("u:Q2+3\nS2+3=5;")  # the question is intact
    assert text(tok, full).startswith(text(tok, cut)[:-1])  # a prefix of the solution
    sib, _ = Prompts(prompts.TOY_TEMPLATES, max_teacher_tokens=12).teacher(
        tok, ex, "sibling", sibling="2+3=5" * 9)
    assert len(sib) <= 12 and text(tok, sib).startswith("u:Q2+3\nS2+3")
