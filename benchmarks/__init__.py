"""Measurement: speed and memory against transformers and CTranslate2; run as python -m benchmarks.<name>."""


def in_turn(names, prompt_index, round_index):
    """`names` (a list) in the order they decode a prompt: each prompt and each round starts one further along the
    list, so that a slow spell of the machine (they last seconds) falls on all of them alike."""
    start = (prompt_index + round_index) % len(names)
    return names[start:] + names[:start]
