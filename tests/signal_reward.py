"""A reward for the equivalence tests: a 30-step warm start rarely answers right, so the
verifier's reward is 0 everywhere, every advantage 0 and every policy gradient exactly 0,
which would make a comparison of gradients vacuous. This one varies within every group."""


def parity(response: str, answer: str, **_) -> dict:
    """1 for an odd number of characters: a deterministic function of the sampled tokens."""
    return {"score": float(len(response) % 2), "acc": len(response) % 2 == 1}
