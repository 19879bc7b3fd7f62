"""Recipes: one TOML file per paper setting in recipes/, loaded with `--preset NAME`.

A recipe is plain data, two tables:
    [about]   what the run assumes: model, dataset (where it comes from), GPUs, the paper
              number it targets, its wall-clock where known. Printed by --list-presets.
    [config]  Config fields (config.py), exactly as the flags would set them; every line
              carries a comment naming its source (paper table or section, or the official
              script) and, where paper and code disagree, which one was chosen and why.
A preset sits between the algorithm's paper defaults and the command line: any flag given
overrides it (`--preset opsd-qwen3-8b --lr 1e-6`). Values a recipe leaves out are the
algorithm's `PAPER_DEFAULTS` (the prompt templates, for instance).
"""
import os

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
MODELS = os.path.join(RECIPES, "models")  # the config.json of every recipe's model
ABOUT = ("model", "data", "gpus", "target", "wall_clock", "needs")


def names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".toml"))


def load(name: str, fields: dict) -> tuple[dict, dict]:
    """(about, config values) of recipes/NAME.toml. `fields`: Config's {name: default}, to
    check every key and type; a bad recipe fails naming the file and the key."""
    path = os.path.join(RECIPES, name + ".toml")
    if name not in names():  # a name in recipes/, never a path to a file elsewhere
        raise SystemExit(f"config error: --preset {name}: no such recipe in recipes/ (python "
                         f"train.py --list-presets lists them: {', '.join(names())})")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"config error: {path}: {e}") from None
    about, values = doc.get("about", {}), doc.get("config", {})
    for table, value in (("about", about), ("config", values)):
        if not isinstance(value, dict):
            raise SystemExit(f"config error: {path}: {table} = {value!r} should be a table "
                             f"[{table}]")
    tables, keys = sorted(set(doc) - {"about", "config"}), sorted(set(about) - set(ABOUT))
    if tables:
        raise SystemExit(f"config error: {path}: unknown table [{tables[0]}] (expected [about], "
                         f"[config])")
    if keys:
        raise SystemExit(f"config error: {path}: [about] {keys[0]} is not one of {', '.join(ABOUT)}")
    for key, value in values.items():
        if key not in fields or key == "preset":
            raise SystemExit(f"config error: {path}: [config] {key} is not an option of "
                             f"train.py (python train.py --help)")
        want = type(fields[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise SystemExit(f"config error: {path}: [config] {key} = {value!r} should be "
                             f"{want.__name__}")
    return about, values


def model_config_dir(model: str) -> str | None:
    """The shipped config.json directory of a hub id (recipes/models/ORG--NAME), if any."""
    path = os.path.join(MODELS, model.replace("/", "--"))
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def listing(fields: dict) -> str:
    """The --list-presets table: name, algorithm, model, dataset, GPUs assumed."""
    rows = [("preset", "algo", "model", "GPUs", "data")]
    for name in names():
        try:
            about, values = load(name, fields)
        except SystemExit as e:  # one bad recipe is named, the others still listed
            rows.append((name, "-", "-", "-", f"(not loadable: {e})"))
            continue
        rows.append((name, values.get("algo", ""), about.get("model", ""),
                     str(about.get("gpus", "")), about.get("data", "")))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], width)) + "  " + r[4] for r in rows]
    return "\n".join(lines) + ("\n\npython train.py --preset NAME --data FILE [flags override the "
                               "recipe]; --dry-run checks one without weights or GPUs")
