"""Rule rewards for PPO tests, importable as "tests.ray.rules:NAME"."""

LOW_IDS = 10000  # ~20% of SmolLM2's 49,152 tokens: a random-init policy starts near 0.2


def low_id_share(example, text, response_ids) -> float:
    """Share of response tokens with an id below LOW_IDS: learnable by a tiny random model in a few dozen
    iterations (it only has to move probability mass towards one block of the vocabulary)."""
    return sum(t < LOW_IDS for t in response_ids) / max(1, len(response_ids))


def high_id_share(example, text, response_ids) -> float:
    """The complement of low_id_share: a gold scorer that disagrees with that proxy (a constructed hacking case)."""
    return 1.0 - low_id_share(example, text, response_ids)
