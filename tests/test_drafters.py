"""Drafters: lookup proposals and rewinds, every drafter (fixed and auto) against regular greedy, what a draft would
compute first, and a draft that shares the main model's encoder. The auto policy itself: test_draft_length.py."""

import mlx.core as mx
import pytest
from conftest import PROMPTS

from decoder import SpeculativeDecoder
from drafters import MAX_CONTINUATION, Draft, LookupDrafter


@pytest.mark.parametrize("num_draft", [1, 3, "auto"])
@pytest.mark.parametrize("drafter", ["model", "lookup", "hybrid"])
def test_every_drafter_fixed_and_auto_equals_regular_greedy(drafter, num_draft, main, drafts):
    model, tokenizer, _ = main
    lookup_drafted = 0
    # Auto tries a length only once the plain steps since its last try have paid for it: longer outputs.
    tokens = 120 if num_draft == "auto" else 40
    for prompt in PROMPTS:
        expected = SpeculativeDecoder(model, None, tokenizer).generate(prompt, tokens, regular=True, ignore_eos=True)
        draft_model = None if drafter == "lookup" else drafts["noisy"]
        decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=num_draft, drafter=drafter)
        result = decoder.generate(prompt, max_tokens=tokens, ignore_eos=True)
        assert result.tokens == expected.tokens, prompt
        lookup_drafted += result.stats.lookup_drafted
        assert result.stats.lookup_drafted <= result.stats.drafted
    # The random model's output repeats itself, so lookups find matches; the model drafter never looks up.
    assert (lookup_drafted > 0) == (drafter != "model")


class LateLookup(LookupDrafter):
    """A lookup whose source appears once the output is `start` tokens long: it proposes the last token repeated."""

    def __init__(self, start):
        super().__init__(max_ngram=3, eos_token_id=1)
        self.start = start

    def source(self, sequence):
        return "lookup" if len(sequence) > self.start else None

    def propose(self, sequence, k, key=None):
        assert len(sequence) > self.start, "asked to draft before its source appeared"
        return Draft(mx.array(sequence[-1:] * k, dtype=mx.int32), None, "lookup")


def test_plain_steps_of_a_lookup_run_built_ahead_until_a_match(main, monkeypatch):
    # Without a match a token-reading drafter's plain steps are a run (each step built before the last token is
    # read, as regular decoding takes them); the run ends once the drafter has a source, and drafting follows.
    model, tokenizer, _ = main
    expected = SpeculativeDecoder(model, None, tokenizer).generate(PROMPTS[4], 40, regular=True, ignore_eos=True).tokens
    decoder = SpeculativeDecoder(model, None, tokenizer, num_draft=3, drafter="lookup")
    monkeypatch.setattr(decoder, "make_drafter", lambda stop=None: LateLookup(start=12))
    runs = []
    plain_tokens = decoder.plain_tokens

    def recorded(*args):
        runs.append(0)
        for token in plain_tokens(*args):
            runs[-1] += 1
            yield token

    monkeypatch.setattr(decoder, "plain_tokens", recorded)
    result = decoder.generate(PROMPTS[4], max_tokens=40, ignore_eos=True)
    assert result.tokens == expected
    # The first run: the 12 tokens after which the source appears, and the one being computed when the drafter was
    # asked about them (a token late).
    assert runs[0] == 13, runs
    assert result.stats.lookup_drafted > 0


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
    # Past the output's end the copy goes on as the output has gone since the match: a loop of period 4, and of 1.
    assert lookup([5, 6, 13, 14, 5, 6], 10) == [13, 14, 5, 6, 13, 14, 5, 6, 13, 14]
    assert lookup([4, 20, 20], 5) == [20, 20, 20, 20, 20]
    assert len(lookup([4, 20, 20], 100)) == MAX_CONTINUATION
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


@pytest.mark.parametrize("drafter", ["model", "hybrid", "lookup"])
def test_drafters_tell_what_a_draft_would_compute_first(drafter, main, drafts):
    # A draft model encodes the prompt at its first draft, and afterwards feeds every token it has not seen; a lookup
    # computes neither.
    model, tokenizer, _ = main
    made = SpeculativeDecoder(model, drafts["noisy"], tokenizer, drafter=drafter).make_drafter()
    prompt_ids = mx.array([tokenizer(PROMPTS[0]).input_ids])
    made.prepare(prompt_ids)
    prompt_tokens = prompt_ids.shape[1] if drafter != "lookup" else 0
    sequence = [model.args.decoder_start_token_id, 5, 6, 7]
    assert made.unready(sequence[:1]) == (prompt_tokens, 0)
    assert made.unready(sequence) == (prompt_tokens, 3 if drafter != "lookup" else 0)
    if drafter != "lookup":
        model_drafter = made if drafter == "model" else made.model_drafter
        mx.eval(model_drafter.propose(sequence, 2, mx.random.key(0)).tokens)
        model_drafter.rewind(len(sequence))  # none of the drafts accepted
        assert made.unready(sequence) == (0, 0)
        assert made.unready(sequence + [8, 9]) == (0, 2)


def decoder_only_perturbed(path, noise, seed):
    """The model at `path` with noise on its decoder's weights alone: a draft that shares the main model's encoder."""
    from mlx.utils import tree_map

    from loader import load_model

    copy, _, _ = load_model(path)
    mx.random.seed(seed)
    copy["decoder"].update(
        tree_map(lambda w: w + noise * mx.std(w) * mx.random.normal(w.shape), copy["decoder"].parameters())
    )
    mx.eval(copy.parameters())
    return copy


@pytest.mark.parametrize("drafter", ["model", "hybrid"])
def test_a_draft_with_the_main_models_encoder_drafts_from_its_encoding(drafter, main, drafts, monkeypatch):
    """A draft whose embeddings and encoder are the main model's is never encoded itself, alone or batched, and drafts
    exactly what it drafts from its own encoding: the same tokens and the same acceptance."""
    from decoder import same_encoder

    model, tokenizer, path = main
    shared = decoder_only_perturbed(path, 0.04, seed=0)
    assert same_encoder(model, shared) and same_encoder(model, model)
    assert not same_encoder(model, drafts["noisy"]) and not same_encoder(model, drafts["unrelated"])

    def runs(decoder):
        alone = [decoder.generate(prompt, 24, ignore_eos=True) for prompt in PROMPTS]
        batched = decoder.generate_batch(PROMPTS, 24, ignore_eos=True, batch_size=3)
        return [(g.tokens, g.stats.drafted, g.stats.accepted) for g in alone + batched]

    reference = SpeculativeDecoder(model, shared, tokenizer, num_draft=3, drafter=drafter)
    reference.shared_encoder = False
    expected = runs(reference)
    decoder = SpeculativeDecoder(model, shared, tokenizer, num_draft=3, drafter=drafter)
    assert decoder.shared_encoder
    encoded = []
    own_encode = type(shared).encode
    monkeypatch.setattr(
        type(shared), "encode", lambda m, *a, **k: encoded.append(m is shared) or own_encode(m, *a, **k)
    )
    assert runs(decoder) == expected
    # hybrid's batched rows draft alone, each encoding its own prompt as a single sequence does
    assert sum(encoded) == (len(PROMPTS) if drafter == "hybrid" else 0)
    assert sum(drafted for _, drafted, _ in expected) > 0
    regular = SpeculativeDecoder(model, None, tokenizer)
    assert [tokens for tokens, _, _ in expected[: len(PROMPTS)]] == [
        regular.generate(prompt, 24, regular=True, ignore_eos=True).tokens for prompt in PROMPTS
    ]
