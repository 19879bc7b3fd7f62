"""Prompts: what the student sees, and what each teacher sees in addition.

    TOY_TEMPLATES, PAPER_TEMPLATES   one format string per kind: the student's prompt, and a
                 teacher prompt per privileged context (answer, solution, hint, rationale,
                 sibling), over the row's fields
    Prompts      how a row becomes token ids: the templates, an optional system message, the
                 chat-template options of the student and of the teacher (Qwen3's
                 `enable_thinking`), a per-row teacher prompt from the data, and a token budget
                 for the teacher's privileged text
    prompts_for  the Prompts of a Config

The teacher templates are the official releases' strings, character for character, with the
row's question where the official code puts the raw question (docs/fidelity.md F11):
  RLSD     examples/visual_rl/format_prompt/teacher_hint_self_distill.jinja (the answer shown
           as a "reference solution", and the <thought>/<answer> format sentence); its student
           prompt, unified.jinja's math branch, is RLSD's default --student-template
  OPSD     the v3 trainer's teacher message ("Problem: ..."; Begin/End markers; the hardened
           "do not copy or paraphrase" transition; the \\boxed{} instruction). Its student
           prompt is "Problem: {prompt}\\n\\n<the \\boxed{} instruction>": OPSD's default
           --student-template (config.py), so {prompt} is the raw problem in both
  SDPO     actor.yaml reprompt_template + solution_template; YAML `|-` keeps no final newline
  PTD-PO   the question, a blank line, the hint; or a whole per-row `prompt_with_hint`
           (--teacher-prompt-key), which replaces the question where a row has one and goes
           through the student's template as the official format prompt does

Every teacher prompt is followed by the student's exact response ids (teachers.py): the teacher
scores the same tokens, only its prompt differs.
"""
import dataclasses
import json
from dataclasses import dataclass, field

from engine import vision
from engine.vision import Media

# The toy tokenizer is character level, so its templates are compact.
TOY_TEMPLATES = {
    "student": "Q{prompt}",
    "answer": "Q{prompt}\nA{answer}",
    "solution": "Q{prompt}\nS{solution}",
    "hint": "Q{prompt}\nH{hint}",
    "rationale": "Q{prompt}\nR{rationale}",
    "sibling": "Q{prompt}\nS{sibling}",
}

# (format strings: `{{}}` renders as the `{}` of \boxed{})
OPSD_ANSWER_INSTRUCTION = ("Please reason step by step, and put your final answer within "
                           "\\boxed{{}}.")
OPSD_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the "
    "reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own words "
    "and independent reasoning, derive the same final answer to the problem above. Think step "
    "by step, explore different approaches, and don't be afraid to backtrack or reconsider if "
    "something doesn't work out:\n")
OPSD_STUDENT = "Problem: {prompt}\n\n" + OPSD_ANSWER_INSTRUCTION
# RLSD's student prompt for math (unified.jinja, the math branch, without the jinja's first
# line break), which its teacher prompt's format sentence repeats
RLSD_STUDENT = (
    "You are an intelligent assistant capable of solving mathematical problems.\n\n"
    "[MATHEMATICS Tasks]\n- Goal: Solve the math problem.\n- Format: You FIRST think about the "
    "reasoning process as an internal monologue enclosed within <thought> </thought> tags. The "
    "final answer MUST be enclosed within <answer> </answer> tags.\n\n{prompt}")

PAPER_TEMPLATES = {
    "student": "{prompt}",
    "answer": "{prompt}\n\nHere is a reference solution:\n{answer}\n\nAfter understanding the "
              "reference solution, please try to solve this problem using your own approach "
              "below. You FIRST think about the reasoning process as an internal monologue "
              "enclosed within <thought> </thought> tags. The final answer MUST be enclosed "
              "within <answer> </answer> tags.",
    "solution": "Problem: {prompt}\n\nHere is a reference solution to this problem:\n"
                "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
                + OPSD_TRANSITION + "\n" + OPSD_ANSWER_INSTRUCTION,
    "hint": "{prompt}\n\n{hint}",
    "rationale": "{prompt}\n\nHere is a rationale for this problem:\n{rationale}",
    "sibling": "{prompt}\nCorrect solution:\n\n{sibling}\n\nCorrectly solve the original question.",
}

# Phrases that only privileged prompts contain: a response that says them has leaked.
LEAK_PHRASES = ("reference solution", "the hint", "the answer is given", "correct solution:")
TOY_LEAK_MARKERS = ("Q", "A", "S", "H", "R")  # toy privileged-context markers


def templates(data_spec: str) -> dict:
    """The embedded tasks' compact templates, or the papers' wording for real data."""
    return TOY_TEMPLATES if data_spec in ("toy", "chains", "shapes", "clips") else PAPER_TEMPLATES


def render(template: str, ex, sibling: str = "") -> str:
    # the row's values are inserted stripped (the official jinja templates `| trim` them)
    return template.format(prompt=ex.prompt.strip(), answer=ex.answer.strip(),
                           solution=ex.solution.strip(), hint=ex.hint.strip(),
                           rationale=ex.rationale.strip(), sibling=sibling)


def prompt_ids(tokenizer, text: str, *, system: str = "", media: Media | None = None,
               **template_kwargs) -> list[int]:
    """Token ids of one user message (after an optional system message) through the model's
    chat template, ready to generate. `template_kwargs` reach the template (enable_thinking).
    `media` (vision.row_media: images, then videos, then audio clips) come first in the
    message, each placeholder expanded to its medium's number of tokens."""
    if getattr(tokenizer, "chat_template", None):
        items = ([{"type": "image"}] * len(media.images) + [{"type": "video"}] * len(media.videos)
                 + [{"type": "audio"}] * len(media.audios)) if media else []
        content = items + [{"type": "text", "text": text}] if items else text
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": content}]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False, **template_kwargs)
        except Exception as e:  # jinja2's sandbox refuses a template that reaches for code
            if type(e).__name__ != "SecurityError":
                raise
            raise SystemExit(f"error: the tokenizer's chat template was refused by the template "
                             f"sandbox, no code of it ran ({e}); use a tokenizer whose template "
                             f"only formats messages") from None
    elif system:  # no chat template (the toy model): the system text simply comes first
        text = system + "\n" + text
    return vision.expand_row(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"],
                             media or Media())


@dataclass
class Prompts:
    """How a row becomes the student's prompt ids and its teacher's."""
    templates: dict
    system: str = ""                                     # a system message before both
    student_options: dict = field(default_factory=dict)  # chat-template kwargs of the student
    teacher_options: dict = field(default_factory=dict)  # ... and of the teacher
    max_teacher_tokens: int = 0                          # 0: no budget for the teacher prompt
    fps: float = 2.0                                     # videos: frames a second (--video-fps)
    audio_in_video: bool = False                         # a video's own audio track too

    def media(self, tok, ex) -> Media:
        """The processed media of row `ex` (vision.row_media), with this run's video options."""
        if ex is None:
            return Media()
        return vision.row_media(tok, ex, fps=self.fps, audio_in_video=self.audio_in_video)

    def ids(self, tok, text: str, *, teacher: bool = False, ex=None) -> list[int]:
        """`ex`: the row whose media (if any) the prompt shows, the teacher's as the student's."""
        return prompt_ids(tok, text, system=self.system, media=self.media(tok, ex),
                          **(self.teacher_options if teacher else self.student_options))

    def student(self, tok, ex) -> list[int]:
        return self.ids(tok, render(self.templates["student"], ex), ex=ex)

    def teacher(self, tok, ex, context: str, sibling: str | None = None) -> tuple[list[int], bool]:
        """(ids, has_context): the teacher's prompt for `context` (a field of the row,
        'sibling' with that sibling's response, or 'none'). A row with nothing to show gets
        the plain student prompt (through the teacher's template options) and False."""
        plain = render(self.templates["student"], ex)
        if context == "none":  # OPD: the teacher is another model, shown the same prompt
            return self.ids(tok, plain, teacher=True, ex=ex), True
        if context == "sibling" and sibling is None:
            return self.ids(tok, plain, teacher=True, ex=ex), False
        if context != "sibling" and getattr(ex, "teacher_prompt", ""):
            # the data's own teacher question, through the student's template (PTD-PO renders
            # prompt_with_hint with the same format prompt as the question)
            inner = _with(ex, "prompt", ex.teacher_prompt)
            return self.ids(tok, render(self.templates["student"], inner), teacher=True,
                            ex=ex), True
        value = sibling if context == "sibling" else getattr(ex, context)
        if not value:
            return self.ids(tok, plain, teacher=True, ex=ex), False
        return self._fit(tok, ex, context, value), True

    def _fit(self, tok, ex, context: str, value: str) -> list[int]:
        """The teacher prompt with the privileged text cut (from its end) until the whole
        prompt has at most max_teacher_tokens tokens (SDPO's max_reprompt_len); the question
        and the instructions around it are never cut."""
        def build(v):
            text = (render(self.templates["sibling"], ex, sibling=v) if context == "sibling"
                    else render(self.templates[context], _with(ex, context, v)))
            return self.ids(tok, text, teacher=True, ex=ex)
        ids = build(value)
        budget = self.max_teacher_tokens
        value_ids = tok(value, add_special_tokens=False)["input_ids"]
        while budget and len(ids) > budget and value_ids:
            value_ids = value_ids[:max(0, len(value_ids) - (len(ids) - budget))]
            ids = build(tok.decode(value_ids))
        return ids


def _with(ex, name: str, value: str):
    return dataclasses.replace(ex, **{name: value})


def _options(text: str, flag: str) -> dict:
    try:
        out = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"config error: {flag} is not valid JSON ({e.msg}): {text!r}")
    if not isinstance(out, dict):
        raise SystemExit(f"config error: {flag} must be a JSON object such as "
                         f"'{{\"enable_thinking\": false}}', got {text!r}")
    return out


def prompts_for(cfg) -> Prompts:
    """The Prompts of a Config: --student-template, --system-prompt, --chat-template-kwargs,
    --teacher-chat-template-kwargs ('' = the student's), --max-teacher-prompt-tokens."""
    tpl = dict(templates(cfg.data))
    if cfg.student_template:
        tpl["student"] = cfg.student_template
    student = _options(cfg.chat_template_kwargs, "--chat-template-kwargs")
    teacher = (_options(cfg.teacher_chat_template_kwargs, "--teacher-chat-template-kwargs")
               if cfg.teacher_chat_template_kwargs else student)
    return Prompts(tpl, system=cfg.system_prompt, student_options=student,
                   teacher_options=teacher, max_teacher_tokens=cfg.max_teacher_prompt_tokens,
                   fps=cfg.video_fps, audio_in_video=cfg.use_audio_in_video)


def prompt_limit(cfg, model) -> int:
    """--max-prompt-tokens, or by default the model's context length minus the response's:
    a longer prompt could not be answered in full, and a huge one would exhaust memory."""
    # max_position_embeddings is the context length of every HF causal LM config we load
    text = model.config.get_text_config()  # a vision-language model's language model
    context = getattr(text, "max_position_embeddings", 0) or 0
    room = max(1, context - cfg.max_new_tokens) if context else 0
    if cfg.max_prompt_tokens:  # and never past the room a response leaves (a paper's 2048
        return min(cfg.max_prompt_tokens, room) if room else cfg.max_prompt_tokens  # on a toy)
    return room


def fit_to_context(examples: list, cfg, model, tok, *, verbose: bool) -> list:
    """The rows of the run, checked against the model's context before any training: the
    response length must leave room for a prompt; a student prompt over the limit (prompt_limit)
    is refused naming its row, or dropped with --long-prompts skip; a teacher prompt (the
    student's plus its answer, solution, hint or rationale) that cannot be followed by a full
    response is refused naming its row (--max-teacher-prompt-tokens cuts the privileged text
    to fit). The embedded tasks' prompts are short: only the lengths are checked for them."""
    import data
    text = model.config.get_text_config()
    context = getattr(text, "max_position_embeddings", 0) or 0
    if context and cfg.max_new_tokens >= context and cfg.algo != "sft":  # SFT generates nothing
        raise SystemExit(f"config error: --max-new-tokens {cfg.max_new_tokens} exceeds "
                         f"{cfg.model}'s context of {context} tokens (a prompt needs room too)")
    limit = prompt_limit(cfg, model)
    if not limit or cfg.data in data.TASKS:
        return examples
    name = ("--max-prompt-tokens" if cfg.max_prompt_tokens == limit else
            "the model's context minus --max-new-tokens =")
    P = prompts_for(cfg)
    examples = data.drop_long_prompts(examples, lambda e: P.student(tok, e), limit,
                                      cfg.long_prompts, source=cfg.data, verbose=verbose,
                                      limit_name=name)
    if context and cfg.teacher_mode != "none" and cfg.context in data.CONTEXTS:
        for e in examples:
            n = len(P.teacher(tok, e, cfg.context)[0])
            if n + cfg.max_new_tokens > context:
                raise data.DataError(
                    f"{e.where or cfg.data}: the teacher's prompt (with the row's "
                    f"{cfg.context}) has {n} tokens, and with --max-new-tokens "
                    f"{cfg.max_new_tokens} exceeds {cfg.model}'s context of {context}; "
                    f"--max-teacher-prompt-tokens cuts the privileged text to fit")
    return examples
