"""Progress on long work (progress.py) and what `python train.py` says before and after."""
import hashlib
import io
import json
import os

from engine import config
from engine.toy import warmstart
from engine.progress import Progress
from tests.conftest import warm_start_dir


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_a_line_per_quarter_with_an_eta():
    out = io.StringIO()
    p = Progress("evaluating", 100, stream=out)
    for i in range(0, 101, 5):
        p.update(i)
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["25/100", "50/100", "75/100",
                                                              "100/100"]
    assert all("eta" in ln for ln in lines)


def test_a_terminal_gets_one_line_rewritten_and_cleared():
    out = _Tty()
    p = Progress("bench", 3, stream=out)
    for i in range(4):
        p.update(i)
    p.close()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 6 and "3/3" in text  # 4 updates, clear
    assert text.endswith("\r")  # cleared: the next print starts on a clean line
    quiet = _Tty()
    Progress("x", 3, stream=quiet, quiet=True).update(1)
    assert quiet.getvalue() == ""


def test_overview_says_what_happens_and_how_long(cache):
    shipped = config.parse_config(["--cache-dir", "/nonexistent-cache"])
    assert "the shipped warm start" in warmstart.overview(shipped)
    fresh = config.parse_config(["--cache-dir", "/nonexistent-cache", "--rebuild-warm-start"])
    assert "one-time warm start" in warmstart.overview(fresh) and "minutes" in warmstart.overview(fresh)
    assert "150 RL steps" in warmstart.overview(fresh) and "runs/rlsd" in warmstart.overview(fresh)
    cached = config.parse_config(["--cache-dir", cache, "--warm-start-steps", "30"])
    assert warm_start_dir(cache)  # the fixture built it
    assert "the cached warm start" in warmstart.overview(cached)


def test_every_shipped_warm_start_is_the_one_its_task_uses_and_its_recorded_bytes():
    """A shipped warm start whose task, SFT settings or weights changed after it was made is
    never silently skipped or trusted: each one in engine/toy/weights/ matches what `python
    train.py --data TASK` asks for today, and its weights hash to the sha256 it records."""
    names = sorted(os.listdir(warmstart.SHIPPED))
    assert {"toy-student-seed0", "chains-student-seed0", "shapes-student-seed0",
            "clips-student-seed0"} <= set(names)
    for name in names:
        task = name.split("-")[0]
        cfg = config.parse_config(["--data", task, "--cache-dir", "/nonexistent-cache"])
        path = os.path.join(warmstart.SHIPPED, name)
        assert warmstart.shipped_warm_start(cfg, cfg.warm_start_steps) == path, name
        with open(os.path.join(path, "warm_start.json")) as f:
            recorded = json.load(f)
        with open(os.path.join(path, "model.safetensors"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == recorded["model_sha256"], name
