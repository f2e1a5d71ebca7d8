"""Drafters and the draft length: lookup proposals and rewinds, every drafter (fixed and auto) against regular greedy,
and the auto policy against measured or modelled costs."""

import mlx.core as mx
import pytest
from conftest import PROMPTS

from decoder import SpeculativeDecoder
from draft_length import AutoDraftLength
from drafters import LookupDrafter


@pytest.mark.parametrize("num_draft", [1, 3, "auto"])
@pytest.mark.parametrize("drafter", ["model", "lookup", "hybrid"])
def test_every_drafter_fixed_and_auto_equals_regular_greedy(drafter, num_draft, main, drafts):
    model, tokenizer, _ = main
    lookup_drafted = 0
    for prompt in PROMPTS:
        expected = SpeculativeDecoder(model, None, tokenizer).generate(prompt, 40, regular=True, ignore_eos=True).tokens
        draft_model = None if drafter == "lookup" else drafts["noisy"]
        decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=num_draft, drafter=drafter)
        result = decoder.generate(prompt, max_tokens=40, ignore_eos=True)
        assert result.tokens == expected, prompt
        lookup_drafted += result.stats.lookup_drafted
        assert result.stats.lookup_drafted <= result.stats.drafted
    # The random model's output repeats itself, so lookups find matches; the model drafter never looks up.
    assert (lookup_drafted > 0) == (drafter != "model")


def lookup(output, k, prompt=(7, 8, 9, 10, 11, 8, 9, 12, 1), max_ngram=3):
    """The tokens a fresh lookup drafter proposes after `output` (the decoder start id 0 goes first)."""
    drafter = LookupDrafter(max_ngram=max_ngram, eos_token_id=1)
    drafter.prepare(mx.array([prompt]))
    return drafter.propose([0, *output], k).tokens.tolist()


def test_lookup_proposes_what_followed_the_most_recent_match():
    # In the prompt: the last output token 11 is followed by 8 9 12 (the prompt's closing EOS is not proposed).
    assert lookup([5, 11], 8) == [8, 9, 12]
    assert lookup([5, 11], 2) == [8, 9]
    # The longest suffix wins: "7 8 9" occurs once, followed by 10; "8 9" and "9" last occur before 12.
    assert lookup([4, 7, 8, 9], 3) == [10, 11, 8]
    assert lookup([4, 7, 8, 9], 3, max_ngram=2) == [12]
    assert lookup([4, 9], 3) == [12]
    # In the output itself, which is more recent than the prompt: "5 6" recurs, followed the first time by 13 14.
    assert lookup([5, 6, 13, 14, 5, 6], 4) == [13, 14, 5, 6]
    assert lookup([8, 9, 3, 9, 8, 9], 2) == [3, 9]
    # No match, no output yet, or nothing after the match: nothing.
    assert lookup([20], 4) == [] and lookup([], 4) == [] and lookup([12], 4) == []
    drafter = LookupDrafter()
    drafter.prepare(mx.array([[3, 4]]))
    assert drafter.source([0, 20]) is None and drafter.source([0, 3]) == "lookup"


def test_lookup_rewind_forgets_the_dropped_output():
    drafter = LookupDrafter(max_ngram=2)
    drafter.prepare(mx.array([[3, 4]]))
    assert drafter.propose([0, 5, 6, 7, 5], 2).tokens.tolist() == [6, 7]
    drafter.rewind(3)  # the sequence is now [0, 5, 6]: 5 -> 6 -> 7 is gone
    assert drafter.propose([0, 5, 6, 9, 5], 2).tokens.tolist() == [6, 9]


class ModelledCost(AutoDraftLength):
    """Step times from a cost model instead of the clock (acceptance is still measured): verifying costs 1, each
    draft 0.2, so that drafting pays exactly when drafts are accepted. Keeps the lengths it chose."""

    def __init__(self, max_num_draft):
        super().__init__(max_num_draft)
        self.chosen = []

    def step_seconds(self, source, k):
        return 1.0 + 0.2 * k

    def choose(self, source, limit):
        self.chosen.append(super().choose(source, limit))
        return self.chosen[-1]


@pytest.mark.parametrize("draft_name", ["self", "unrelated"])
def test_auto_drafts_the_most_with_an_always_right_draft_and_none_with_a_wrong_one(draft_name, main, drafts):
    model, tokenizer, _ = main
    policy = ModelledCost(max_num_draft=6)
    decoder = SpeculativeDecoder(model, drafts[draft_name], tokenizer, num_draft="auto", max_num_draft=6)
    decoder.make_draft_length = lambda: policy
    stats = decoder.generate(PROMPTS[4], max_tokens=150, ignore_eos=True).stats
    settled = policy.chosen[4:-1]  # after the first tries, before the last step (cut short by max_tokens)
    if draft_name == "self":
        assert stats.accepted == stats.drafted
        assert settled.count(6) >= 0.8 * len(settled), policy.chosen
    else:
        assert settled.count(0) >= 0.8 * len(settled), policy.chosen


def simulate(policy, source, accepted, cost, steps=64):
    """The lengths `policy` chooses when a step of k drafts accepts accepted(k) of them and takes cost(k) seconds."""
    chosen = []
    for _ in range(steps):
        k = policy.choose(source, limit=100)
        chosen.append(k)
        policy.record(source, k, accepted(k), cost(k))
    return chosen


def test_auto_follows_the_measured_costs_and_acceptance():
    # Always accepted: cheap drafts pay up to the maximum; drafts dearer than a verification never pay.
    chosen = simulate(AutoDraftLength(8), "model", lambda k: k, lambda k: 1.0 + 0.1 * k)
    assert chosen[-8:].count(8) >= 7, chosen
    chosen = simulate(AutoDraftLength(8), "model", lambda k: k, lambda k: 1.0 + 1.5 * k)
    assert chosen[-8:].count(0) >= 7, chosen
    # Drafts that pay, but by less than MIN_GAIN (8 drafts: 9 tokens in 8.6 step times, 4.7% faster), are left alone.
    chosen = simulate(AutoDraftLength(8), "model", lambda k: k, lambda k: 1.0 + 0.95 * k)
    assert chosen[-8:].count(0) >= 7, chosen
    # Never accepted, drafts nearly free: still none, since no draft adds a token.
    chosen = simulate(AutoDraftLength(8), "lookup", lambda k: 0, lambda k: 1.0 + 0.01 * k)
    assert chosen[-8:].count(0) >= 7, chosen
    # Per position: the first draft always accepted, the second never. E(1) = E(2) = 2 tokens, and one draft is
    # cheaper than two.
    chosen = simulate(AutoDraftLength(8), "model", lambda k: min(k, 1), lambda k: 1.0 + 0.1 * k)
    assert chosen[-8:].count(1) >= 7, chosen
    # Times and acceptance are kept per source: lookups accepted, the model's drafts not.
    policy = AutoDraftLength(8)
    for _ in range(32):
        simulate(policy, "lookup", lambda k: k, lambda k: 1.0 + 0.05 * k, steps=1)
        simulate(policy, "model", lambda k: 0, lambda k: 1.0 + 0.3 * k, steps=1)
    assert policy.choose("lookup", limit=100) >= 7 and policy.choose("model", limit=100) <= 1
    # And never more than the tokens left allow.
    assert policy.choose("lookup", limit=3) <= 3
