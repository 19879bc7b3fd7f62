"""Read it like nanoGPT: go-to-definition follows RLSD from the training step to its idea.

The path (train.py's docstring, README "How to read it"):
    train.train_step -> train.update_mini_batch -> losses.backward_chunked -> losses.chunk_loss
    -> losses.rlsd_chunk_loss -> rlsd.rlsd_loss (-> rlsd.rlsd_token_advantages, Eqs. 13-15)
Read from the source, each stop calls the next by name, with no functools.partial, lambda,
nested function or call of a parameter (a callable handed in; the phase timer of
`with sw("rollout"):` aside) on the way; and at run time the
stops are consecutive frames of the call stack when RLSD's token advantages are computed."""
import ast
import inspect
import json
import os
import sys

import rlsd
import train
from engine import losses

PATH = [(train, "train_step"), (train, "update_mini_batch"), (losses, "backward_chunked"),
        (losses, "chunk_loss"), (losses, "rlsd_chunk_loss"), (rlsd, "rlsd_loss"),
        (rlsd, "rlsd_token_advantages")]


def _function(module, name) -> ast.FunctionDef:
    tree = ast.parse(inspect.getsource(module))
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _called_names(fn: ast.FunctionDef) -> set:
    """Every name called in `fn` (f(...) and mod.f(...)), and every name handed as an argument
    (checkpoint(chunk_loss, ...) calls chunk_loss)."""
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None))
            out |= {a.id for a in node.args if isinstance(a, ast.Name)}
    return out


def test_each_stop_calls_the_next_by_name():
    for (mod, name), (_, nxt) in zip(PATH, PATH[1:]):
        assert nxt in _called_names(_function(mod, name)), f"{name} does not call {nxt}"


def test_no_partial_closure_or_callable_parameter_on_the_path():
    for mod, name in PATH:
        fn = _function(mod, name)
        params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        timers = {id(i.context_expr) for w in ast.walk(fn) if isinstance(w, ast.With)
                  for i in w.items}  # `with sw("rollout"):` times a phase, computes nothing
        for node in ast.walk(fn):
            assert not isinstance(node, (ast.Lambda, ast.FunctionDef)) or node is fn, \
                f"{name}: a nested function or lambda"
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                assert called != "partial", f"{name}: functools.partial"
                assert id(node) in timers or not (isinstance(f, ast.Name) and f.id in params), \
                    f"{name} calls its parameter {f.id}"


def test_the_chunk_loss_is_a_short_dispatch():
    fn = _function(losses, "chunk_loss")
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # minus the docstring
    assert body[-1].end_lineno - body[0].lineno + 1 <= 25


def test_at_run_time_the_stops_are_consecutive_frames(tmp_path, cache, monkeypatch):
    """One RLSD step: when rlsd_token_advantages runs, the frames above it are exactly the
    path, innermost first (one LM-head chunk: no activation-checkpointing frame between)."""
    seen = []
    real = rlsd.rlsd_token_advantages

    def spy(*args, **kwargs):
        frames = [f.function for f in inspect.stack()[1:len(PATH)]]
        seen.append(frames)
        return real(*args, **kwargs)

    monkeypatch.setattr(rlsd, "rlsd_token_advantages", spy)
    out = str(tmp_path / "run")
    train.main(["--algo", "rlsd", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                "--max-new-tokens", "8", "--eval-data", "", "--warm-start-steps", "30",
                "--cache-dir", cache, "--out", out, "--reward", "signal_reward:parity"])
    assert seen, "RLSD's token advantages were never computed"
    assert seen[0] == [name for _, name in PATH[-2::-1]]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert "rlsd_weight_clip_frac" in json.loads(f.readlines()[-1])
    assert "tests" in sys.modules["signal_reward"].__file__  # the reward the test means
