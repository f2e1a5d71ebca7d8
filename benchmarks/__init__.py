"""Measurement: speed and memory against transformers and CTranslate2; run as python -m benchmarks.<name>."""


def in_turn(names, prompt_index, round_index):
    """`names` (a list) in the order they decode a prompt: the rows of a balanced Latin square (Williams' design), one
    further along at each prompt and round. Over its rows each name takes every place once, so that a slow spell of
    the machine (they last seconds) falls on all alike, and follows every other name equally often: one that follows a
    heavy run (a long draft from a model that is never accepted) pays for what that run leaves behind. Rotating one
    order instead kept each name after the same one, which cost the one after the heaviest 5-15% of its speed."""
    rows = balanced_orders(len(names))
    return [names[i] for i in rows[(prompt_index + round_index) % len(rows)]]


def balanced_orders(n):
    """Orders of range(n) in which each number takes every place equally often and each ordered pair of numbers is
    adjacent equally often: n orders where n is even, 2n (each also reversed) where it is odd."""
    # 0, 1, n - 1, 2, n - 2, ...: its steps, taken mod n, are every nonzero difference once.
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    rows = [[(x + shift) % n for x in first] for shift in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]
