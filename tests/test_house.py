"""The house: no import cycles, no import from a floor above, and what pip installs.

Floors, from the ground up: the math (grpo, rlsd, distill) and what data is (data); the
machinery that runs them (engine/); the embedded toy world (engine/toy/: tasks, tiny models,
warm start), which uses the machinery and is used by none of it, but for `--dry-run`'s report
(engine/dryrun.py, which sizes the toy model too); the two entry points (eval, then train,
which uses eval's evaluation); the tools (tools/). Every import of every module,
function-level ones included, is read from the source (ast) and must go to the same floor or
one below, and the graph must have no cycle."""
import ast
import os

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = ("grpo", "rlsd", "distill", "data", "train", "eval")  # the design card's files
FLOOR = {"grpo": 0, "rlsd": 0, "distill": 0, "data": 0, "engine": 1, "engine.toy": 2,
         "engine.dryrun": 3, "eval": 4, "train": 5, "tools": 6}


def modules(root: str = ROOT) -> dict:
    """{dotted module name: file} of the project: the root's modules, engine/, tools/."""
    out = {}
    for folder in ("", "engine", os.path.join("engine", "toy"), "tools"):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".py"):
                dotted = ".".join(filter(None, folder.split(os.sep) + [name[:-3]]))
                out[dotted.removesuffix(".__init__")] = os.path.join(root, folder, name)
    return out


def imports(path: str, known: set) -> set:
    """The project modules `path` imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:  # the longest known prefix: engine.losses, not engine
            parts = name.split(".")
            hit = next((".".join(parts[:k]) for k in range(len(parts), 0, -1)
                        if ".".join(parts[:k]) in known), None)
            if hit:
                found.add(hit)
    return found


def graph(root: str = ROOT) -> dict:
    mods = modules(root)
    return {m: imports(f, set(mods)) - {m} for m, f in mods.items()}


def cycles(g: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def floor(module: str) -> int:
    """The floor of a module: its own entry, else its package's (engine.toy.tasks: engine.toy)."""
    parts = module.split(".")
    return next(FLOOR[".".join(parts[:k])] for k in range(len(parts), 0, -1)
                if ".".join(parts[:k]) in FLOOR)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_a_planted_cycle_is_found():
    """The check can fail: one function-level import from the ground floor back up to the
    trainer closes a loop through every floor between them."""
    g = graph()
    assert "train" in g and "engine.losses" in g["train"] | {d for m in g["train"] for d in g[m]}
    g["rlsd"] = g["rlsd"] | {"train"}
    assert any({"rlsd", "train"} <= set(c) for c in cycles(g))


def test_a_function_level_import_is_read(tmp_path):
    """Imports inside functions count: they are how a cycle hides."""
    (tmp_path / "engine" / "toy").mkdir(parents=True)
    (tmp_path / "tools").mkdir()
    (tmp_path / "grpo.py").write_text("def f():\n    from engine import losses\n")
    (tmp_path / "engine" / "losses.py").write_text("import grpo\n")
    assert cycles(graph(str(tmp_path))) == [["engine.losses", "grpo"]]


def test_nothing_imports_from_a_floor_above():
    up = [(m, d) for m, deps in graph().items() for d in deps if floor(d) > floor(m)]
    assert up == []


def test_the_machinery_never_imports_the_toy_world():
    """engine/ runs any model on any data; only engine/toy/ (and --dry-run's sizing) knows the
    embedded tasks. A planted import from the machinery into the toy world is caught."""
    g = graph()
    assert floor("engine.sft") < floor("engine.toy.tasks") < floor("engine.dryrun")
    g["engine.sft"] = g["engine.sft"] | {"engine.toy.tasks"}
    up = [(m, d) for m, deps in g.items() for d in deps if floor(d) > floor(m)]
    assert up == [("engine.sft", "engine.toy.tasks")]


def test_pip_installs_the_concept_modules_and_one_package():
    """pyproject.toml lists exactly the root's modules (the design card's concept files) and
    the one package with its subpackages, as they are in the tree."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        st = tomllib.load(f)["tool"]["setuptools"]
    root_modules = sorted(n[:-3] for n in os.listdir(ROOT) if n.endswith(".py"))
    assert sorted(st["py-modules"]) == root_modules == sorted(CONCEPTS)
    packages = sorted(".".join(os.path.relpath(d, ROOT).split(os.sep))
                      for d, _, files in os.walk(os.path.join(ROOT, "engine"))
                      if "__init__.py" in files)
    assert sorted(st["packages"]) == packages
    assert {p.split(".")[0] for p in st["packages"]} == {"engine"}


@pytest.mark.parametrize("name", CONCEPTS)
def test_the_concept_files_stay_at_the_top(name):
    assert os.path.isfile(os.path.join(ROOT, f"{name}.py"))
