"""The order in which benchmarks decode each prompt with the settings they compare (benchmarks.in_turn): a setting that
always ran right after the heaviest one paid for it in every comparison."""

from collections import Counter

import pytest

from benchmarks import in_turn


@pytest.mark.parametrize("n", range(2, 9))
def test_every_setting_takes_every_place_and_follows_every_other_equally_often(n):
    names = [f"setting {i}" for i in range(n)]
    # One full cycle of orders: n prompts where n is even, 2n where it is odd; the rounds continue it.
    cycle = n if n % 2 == 0 else 2 * n
    orders = [in_turn(names, prompt, round_) for round_ in range(2) for prompt in range(cycle)]
    assert all(sorted(order) == names for order in orders)
    places = Counter((name, order.index(name)) for order in orders for name in order)
    assert set(places.values()) == {len(orders) // n} and len(places) == n * n
    pairs = Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1
