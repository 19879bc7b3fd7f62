"""The loss-path change kept every step bit-identical: the first three steps of every
algorithm (and of the paths only some settings take) against the fingerprints recorded
before it (tests/identity.py, identity_golden.json). Floating-point results depend on the
CPU's vector units, the thread count and the library versions, so the comparison runs only
in the environment the fingerprints were recorded in, and says so otherwise."""
import json
import os

import pytest

import identity

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_golden.json")


def test_first_three_steps_of_every_algorithm_are_bit_identical():
    with open(GOLDEN) as f:
        golden = json.load(f)
    if identity.environment() != golden["environment"]:
        pytest.skip(f"recorded in {golden['environment']}, this is {identity.environment()}: "
                    f"bit-identity is only defined within one environment")
    now = identity.record()
    assert identity.differences(now, golden) == []


def test_a_changed_step_is_caught():
    """The comparison can fail: one weight hash and one metric changed."""
    with open(GOLDEN) as f:
        golden = json.load(f)
    bent = json.loads(json.dumps(golden))
    bent["cases"]["rlsd"]["weights"] = "0" * 16
    bent["cases"]["grpo"]["metrics"]["loss"] = "0" * 16
    diff = identity.differences(bent, golden)
    assert diff == ["grpo: metrics differ: loss", "rlsd: the weights after step 3 differ"] \
        or sorted(diff) == sorted(["grpo: metrics differ: loss",
                                   "rlsd: the weights after step 3 differ"])
