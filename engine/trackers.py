"""--report-to: the same records as metrics.jsonl, also in TensorBoard, W&B or Trackio.

metrics.jsonl stays the primary log (every step, one JSON line, flushed); a tracker gets the
same numbers, at the same step, plus the resolved config once. Each is an optional extra,
imported only when asked for, and works offline:
    tensorboard   event files in <out>/tensorboard/ (`tensorboard --logdir <out>`);
                  pip install tensorboard
    wandb         wandb.init(dir=<out>); WANDB_MODE=offline keeps it on disk (`wandb sync`);
                  WANDB_PROJECT names the project (default rlsd-reference); pip install wandb
    trackio       a local Trackio database; TRACKIO_PROJECT names the project;
                  pip install trackio
Only rank 0 reports. A tracker that fails to start stops the run before any training.
"""
import dataclasses
import json
import os

TRACKERS = ("tensorboard", "wandb", "trackio")


def names(spec: str) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; an unknown name is a ValueError."""
    out = [n.strip() for n in spec.split(",") if n.strip()]
    for n in out:
        if n not in TRACKERS:
            raise ValueError(f"--report-to {n}: expected some of {', '.join(TRACKERS)}")
    return out


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"--report-to {module} needs the {module} package: "
                         f"pip install {module}") from None


class Trackers:
    """Open every tracker of `cfg.report_to`; `log(record)` sends a metrics record to each."""

    def __init__(self, cfg):
        self.writers = []
        config = dataclasses.asdict(cfg)
        run = os.path.basename(os.path.normpath(cfg.out))
        for name in names(cfg.report_to):
            if name == "tensorboard":
                _need("tensorboard")
                from torch.utils.tensorboard import SummaryWriter
                w = SummaryWriter(log_dir=os.path.join(cfg.out, "tensorboard"))
                w.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
                self.writers.append(("tensorboard", w))
            elif name == "wandb":
                wandb = _need("wandb")
                w = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlsd-reference"),
                               name=run, dir=cfg.out, config=config)
                self.writers.append(("wandb", w))
            else:
                trackio = _need("trackio")
                trackio.init(project=os.environ.get("TRACKIO_PROJECT", "rlsd-reference"),
                             name=run, config=config)
                self.writers.append(("trackio", trackio))

    def log(self, record: dict):
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, w in self.writers:
            if name == "tensorboard":
                for k, v in scalars.items():
                    w.add_scalar(k, v, step)
                w.flush()
            else:
                w.log(scalars, step=step)

    def close(self):
        for name, w in self.writers:
            if name == "tensorboard":
                w.close()
            else:
                w.finish()
        self.writers = []
