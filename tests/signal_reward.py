"""A reward for the equivalence tests: a 30-step warm start rarely answers right, so the
verifier's reward is 0 everywhere, every advantage 0 and every policy gradient exactly 0,
which would make a comparison of gradients vacuous. This one varies within most groups."""


def parity(response: str, answer: str, **_) -> dict:
    """1 when the response's characters' code points add up to an odd number: a deterministic
    function of every sampled token (its length alone does not vary: most responses of a
    barely warm-started model run to --max-new-tokens)."""
    odd = sum(map(ord, response)) % 2 == 1
    return {"score": float(odd), "acc": odd}
