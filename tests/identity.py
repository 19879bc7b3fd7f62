"""The first three steps of every algorithm, as one fingerprint per case: a refactoring of the
training path must leave every one of them bit-identical (tests/test_identity.py).

    python tests/identity.py OUT.json            # record (about 2 minutes on 2 CPU cores)
    python tests/identity.py OUT.json --compare GOLDEN.json

A case is three steps of `train.py` on a tiny warm start (30 SFT steps, built here) with a
reward that varies within every group (signal_reward.py), so no advantage is 0 by
construction. Its fingerprint is the SHA-256 of the final weights and of each step metric's
values (timings left out; a metric added later is new, and changes no other's). Floating-point
results depend on the CPU's vector units, the thread count and the library versions, so a
recording also names its environment; fingerprints compare only within one environment.
"""
import hashlib
import json
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

COMMON = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens",
          "12", "--eval-data", "", "--reward", "signal_reward:parity", "--lr", "1e-3",
          "--save-every", "0", "--keep-checkpoints", "1"]
# (name, flags): every algorithm, and the paths that only some settings take (several updates
# per batch, chunked LM head, micro-batches, LoRA, the teacher modes, the KL, the controls)
CASES = [(a, ["--algo", a]) for a in ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "rlsd",
                                      "opsd", "sdpo", "srpo", "ptdpo")] + [
    ("opd", ["--algo", "opd", "--teacher", "{teacher}"]),
    ("sft", ["--algo", "sft", "--model", "{warm}"]),
    ("toy_warm_start", ["--algo", "grpo", "--model", "toy", "--warm-start-steps", "30"]),
    ("grpo_mini", ["--algo", "grpo", "--mini-batch-size", "2", "--kl-coef", "0.04"]),
    ("gspo_mini", ["--algo", "gspo", "--mini-batch-size", "2"]),
    ("rlsd_mini", ["--algo", "rlsd", "--mini-batch-size", "2", "--ppo-epochs", "2"]),
    ("rlsd_other", ["--algo", "rlsd", "--context-source", "other", "--teacher-sync", "2"]),
    ("sdpo_mini", ["--algo", "sdpo", "--mini-batch-size", "2", "--micro-batch-size", "3"]),
    ("sdpo_trust", ["--algo", "sdpo", "--teacher-mode", "trust"]),
    ("srpo_mini", ["--algo", "srpo", "--mini-batch-size", "2", "--logit-chunk", "5"]),
    ("opsd_chunked", ["--algo", "opsd", "--logit-chunk", "4", "--micro-batch-size", "2",
                      "--distill-agg", "seq-mean"]),
    ("ptdpo_exact", ["--algo", "ptdpo", "--ptd-divergence", "jsd-exact"]),
    ("ptdpo_forward", ["--algo", "ptdpo", "--ptd-divergence", "forward", "--mini-batch-size", "2"]),
    ("grpo_lora", ["--algo", "grpo", "--lora-rank", "4"]),
    ("srpo_kl", ["--algo", "srpo", "--kl-coef", "0.02"]),
    ("opsd_live", ["--algo", "opsd", "--teacher-mode", "live"]),
]
NOT_HASHED = ("step_time_s",)  # wall times; every key starting with time_ too


def environment() -> dict:
    import torch
    import transformers
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu,
            "threads": torch.get_num_threads()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(out: str) -> dict:
    """{weights: sha, metrics: {name: sha of its values}} of one finished run directory."""
    values = {}  # metric -> its value at each step (a metric added later changes no other's)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            for k, v in json.loads(line).items():
                if k not in NOT_HASHED and not k.startswith("time_"):
                    values.setdefault(k, []).append(v)
    (ck,) = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    weights = b""
    for name in sorted(os.listdir(os.path.join(out, ck))):
        if name.endswith(".safetensors"):
            with open(os.path.join(out, ck, name), "rb") as f:
                weights += f.read()
    return {"weights": _sha(weights),
            "metrics": {k: _sha(json.dumps(v).encode()) for k, v in sorted(values.items())}}


def record(names=None) -> dict:
    import torch
    import train
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="identity-")
    cache = os.path.join(tmp, "cache")

    def warm(seed: int) -> str:  # a 30-step warm start, as a plain model directory
        out = os.path.join(tmp, f"warm{seed}")
        train.main(["--algo", "sft", "--model", "toy-init", "--steps", "30", "--seed", str(seed),
                    "--prompts-per-step", "8", "--lr", "2e-3", "--eval-data", "",
                    "--cache-dir", cache, "--out", out])
        (ck,) = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
        return os.path.join(out, ck)

    paths = {"warm": warm(0), "teacher": warm(1)}
    result = {}
    for name, flags in CASES:
        if names and name not in names:
            continue
        out = os.path.join(tmp, name)
        flags = [f.format(**paths) for f in flags]
        model = [] if "--model" in flags else ["--model", paths["warm"]]
        train.main([*flags, *model, *COMMON, "--cache-dir", cache, "--out", out])
        result[name] = fingerprint(out)
    return {"environment": environment(), "cases": result}


def differences(now: dict, golden: dict) -> list[str]:
    """The cases whose fingerprints differ, one line each ([] when every one is identical)."""
    out = []
    for name, fp in golden["cases"].items():
        got = now["cases"].get(name)
        if got is None:
            out.append(f"{name}: not run")
            continue
        if got["weights"] != fp["weights"]:
            out.append(f"{name}: the weights after step 3 differ")
        changed = [k for k, v in fp["metrics"].items() if got["metrics"].get(k) != v]
        if changed:
            out.append(f"{name}: metrics differ: {', '.join(changed)}")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path, rest = argv[0], argv[1:]
    now = record()
    with open(path, "w") as f:
        json.dump(now, f, indent=1)
    if rest[:1] == ["--compare"]:
        with open(rest[1]) as f:
            golden = json.load(f)
        if golden["environment"] != now["environment"]:
            print(f"environments differ: {golden['environment']} vs {now['environment']}")
        diff = differences(now, golden)
        print("\n".join(diff) if diff else f"all {len(golden['cases'])} cases bit-identical")
        raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
