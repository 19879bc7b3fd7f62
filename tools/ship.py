"""Make the warm starts that ship with the project (engine/toy/weights/), so that `python
train.py` starts training at once instead of spending minutes on supervised fine-tuning.

    python tools/ship.py --data toy --seed 0                # build it here, then ship it
    python tools/ship.py --data toy --seed 0 --from DIR     # ship a warm start built before

A shipped warm start is the directory train.py's toy warm start writes (weights, config,
tokenizer) plus warm_start.json: its settings key (warmstart.settings_key: the SFT settings
and the task's definition), what built it (library versions, CPU, threads, seconds) and the
SHA-256 of its weights. train.py uses it whenever the run's warm-start settings give the same
key, and says so; --rebuild-warm-start trains one instead. The weights of a rebuild depend on
the CPU and the thread count (a float sum split over threads is ordered differently), which
is why one is shipped at all: the numbers a fresh clone prints are then the README's.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def provenance(source: str) -> dict:
    """What the study recorded about the machine a warm start was built on: the
    environment.json of the run directory that holds it (two levels up), or "unknown"."""
    for up in (source, os.path.dirname(source), os.path.dirname(os.path.dirname(source))):
        path = os.path.join(up, "environment.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {"threads": "unknown", "cpu": "unknown"}


def main(argv=None):
    import torch
    import transformers
    from engine import config
    from engine.distributed import Dist
    from engine.toy import warmstart
    p = argparse.ArgumentParser(description="Ship a toy warm start (engine/toy/weights/).")
    p.add_argument("--data", default="toy", help="the embedded task: toy, chains, shapes, clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="source", default="", help="a warm-start directory built "
                   "before (by train.py or the study), instead of building one here")
    a = p.parse_args(argv)
    cfg = config.resolve_config(dict(algo="grpo", data=a.data, seed=a.seed), paths=False)
    steps = cfg.warm_start_steps
    t0, source = time.time(), a.source
    if not source:
        cfg.cache_dir = tempfile.mkdtemp(prefix="ship-")
        source = warmstart.toy_checkpoint(cfg, Dist(), steps=steps, name="student")
    dest = os.path.join(warmstart.SHIPPED, f"{warmstart.task_of(cfg)}-student-seed{a.seed}")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for f in FILES:
        if os.path.exists(os.path.join(source, f)):
            shutil.copyfile(os.path.join(source, f), os.path.join(dest, f))
    with open(os.path.join(dest, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    built = {"torch": torch.__version__, "transformers": transformers.__version__,
             "cpu": cpu, "threads": torch.get_num_threads(),
             "seconds": round(time.time() - t0)}
    if a.source:  # built elsewhere: its study's environment.json says with what, if there
        built = {"seconds": None, **provenance(a.source)}
    record = {"settings": warmstart.settings_key(warmstart._sft_config(cfg, steps, cfg.demo_slip)),
              "task": warmstart.task_of(cfg), "seed": a.seed, "sft_steps": steps,
              "model_sha256": digest,
              "built_from": a.source or "tools/ship.py", "built_with": built}
    with open(os.path.join(dest, "warm_start.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"shipped {dest} ({os.path.getsize(os.path.join(dest, 'model.safetensors')) / 1e6:.2f} "
          f"MB of weights): {json.dumps(record)}")


if __name__ == "__main__":
    main()
