"""The docs stay true: every flag the README and docs/ name exists in the --help of the command
it is given to, every relative path they name exists, the quick start's commands parse, and no
reference in them or in the code's comments points outside the repository."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "SECURITY.md", "recipes/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = {"train.py": "train.py", "eval.py": "eval.py", "tools/study.py": "tools/study.py",
           "tools/bench.py": "tools/bench.py", "tools/ship.py": "tools/ship.py"}


def text(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


_HELP = {}


def flags_of(script: str) -> set:
    """Every --flag of a script's --help (argparse lists them all)."""
    if script not in _HELP:
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120).stdout
        _HELP[script] = set(re.findall(r"(--[a-z][a-z0-9_-]*)", out))
    return _HELP[script]


def commands(page: str):
    """(script, argv) of every command line in the page's code blocks, continuation lines
    joined ('\\' at the end), comments dropped."""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text(page), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            try:
                words = shlex.split(line, comments=True) if not line.startswith("#") else []
            except ValueError as e:
                raise AssertionError(f"{page}: a command that does not parse: {line!r} ({e})")
            for i, w in enumerate(words):
                if w in SCRIPTS:
                    yield w, words[i + 1:]
                    break


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_given_to_a_command_exists(page):
    for script, argv in commands(page):
        unknown = [a.split("=")[0] for a in argv if a.startswith("--")
                   and a.split("=")[0] not in flags_of(SCRIPTS[script])]
        assert not unknown, f"{page}: {script} has no {unknown}"


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_named_in_the_text_exists_somewhere(page):
    known = set().union(*(flags_of(s) for s in SCRIPTS.values())) | {"--nproc_per_node",
                                                                      "--nnodes",
                                                                      "--rdzv_backend",
                                                                      "--rdzv_endpoint",
                                                                      "--extra-index-url",
                                                                      "--index-url", "--no-flag", "--logdir",
                                                                      "--flag"}
    named = set(re.findall(r"`[^`]*?(--[a-z][a-z0-9_-]*)", text(page)))
    assert not named - known, f"{page}: no command has {sorted(named - known)}"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_path_exists(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text(page))
    missing = [p for p in links if not p.startswith(("http://", "https://", "mailto:"))
               and not os.path.exists(os.path.normpath(os.path.join(base, p)))]
    named = re.findall(r"`((?:engine|tools|tests|recipes|docs)/[\w./-]*\w)`", text(page))
    missing += [p for p in named if "*" not in p
                and not os.path.exists(os.path.join(ROOT, p.split(" ")[0]))]
    assert not missing, f"{page}: {missing}"


def test_the_quick_start_is_in_the_first_40_lines_and_parses():
    head = "\n".join(text("README.md").splitlines()[:40])
    for needed in ("pip install torch==2.13.0", "python train.py", "python eval.py --compare",
                   "python -m pytest", "download.pytorch.org/whl/cpu"):
        assert needed in head, needed
    from engine import config
    import eval as evaluation
    for script, argv in commands("README.md"):
        if script == "train.py" and "--preset" not in argv and "--data" not in argv:
            try:
                config.parse_config(argv)  # a bad flag: SystemExit(2)
            except SystemExit as e:  # --list-presets and the like print, then exit 0
                assert e.code in (0, None), (argv, e.code)
        if script == "eval.py" and argv[:1] == ["--compare"]:
            evaluation.parse_args(argv)


def test_the_readme_is_a_door():
    assert len(text("README.md").encode()) <= 15 * 1024


def test_no_reference_points_outside_the_repository():
    outside = re.compile(r"shared/spec|spec notes|steering repository|fidelity-audit|"
                         r"\baudit F\d+|STYLE §|\.\./shared")
    files = PAGES + [os.path.relpath(p, ROOT) for p in
                     glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
                     + glob.glob(os.path.join(ROOT, "recipes", "*.toml"))
                     if "/.venv" not in p and "/.ci-venv" not in p and "/tests/" not in p]
    found = [f for f in files if outside.search(text(f))]
    assert not found, found
    headings = set(re.findall(r"\*\*(F\d+)\.", text("docs/fidelity.md")))
    for f in files:
        for ref in re.findall(r"docs/fidelity\.md (F\d+)", text(f)):
            assert ref in headings, (f, ref)
