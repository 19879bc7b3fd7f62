"""--report-to (trackers.py): TensorBoard event files hold what metrics.jsonl holds (read back
here); W&B and Trackio get the same calls (checked with stand-in modules, offline)."""
import json
import os
import sys
import types

import pytest

from engine import config
import train
from tests.test_train import TINY


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tensorboard_events_equal_metrics_jsonl(tmp_path, cache):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    train.main(TINY + ["--algo", "grpo", "--cache-dir", cache, "--out", out,
                       "--report-to", "tensorboard"])
    rows = _rows(out)
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    for key in ("loss", "reward_mean", "entropy", "test_acc"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        want = {r["step"]: r[key] for r in rows if key in r}
        assert logged.keys() == want.keys(), key
        for step, v in want.items():
            assert logged[step] == pytest.approx(v, rel=1e-6, abs=1e-6), (key, step)
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, once


class _Stand:  # records what a tracker module is asked to do
    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self

    def log(self, metrics, step=None):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_wandb_and_trackio_get_every_record(tmp_path, cache, monkeypatch, name):
    stand = _Stand()
    module = types.ModuleType(name)
    module.init, module.log, module.finish = stand.init, stand.log, stand.finish
    monkeypatch.setitem(sys.modules, name, module)
    out = str(tmp_path / "run")
    train.main(TINY + ["--algo", "grpo", "--cache-dir", cache, "--out", out, "--report-to", name])
    rows = _rows(out)
    (init,) = [c for c in stand.calls if c[0] == "init"]
    assert init[1]["config"]["algo"] == "grpo" and init[1]["name"] == "run"
    logs = [c for c in stand.calls if c[0] == "log"]
    assert [c[1] for c in logs] == [r["step"] for r in rows]
    assert all(c[2]["loss"] == r["loss"] for c, r in zip(logs, rows) if "loss" in r)
    assert stand.calls[-1] == ("finish",)


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(SystemExit, match="--report-to mlflow"):
        config.parse_config(["--report-to", "tensorboard,mlflow"])


def test_missing_tracker_package_is_named(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit, match="pip install wandb"):
        train.main(TINY + ["--algo", "grpo", "--cache-dir", cache, "--out",
                           str(tmp_path / "r"), "--report-to", "wandb"])
