"""SpeculativeDecoder: lossless greedy, the delta relaxation, exact sampling, EOS and max_tokens."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPTS
from mlx.utils import tree_flatten

import decoder as decoder_module
import model as model_module
from decoder import IncompatibleDraftError, SpeculativeDecoder
from loader import load_model
from model import T5, ModelArgs


def regular(main, prompt, max_tokens, **options):
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, None, tokenizer, **options)
    return decoder.generate(prompt, max_tokens=max_tokens, regular=True, ignore_eos=True)


@pytest.mark.parametrize("draft_name", ["noisy", "unrelated", "self"])
def test_speculative_greedy_equals_regular_greedy(draft_name, main, drafts):
    model, tokenizer, _ = main
    accepted = drafted = 0
    for prompt_index, prompt in enumerate(PROMPTS):
        expected = regular(main, prompt, max_tokens=40).tokens
        for num_draft in range(1, 9):
            decoder = SpeculativeDecoder(model, drafts[draft_name], tokenizer, num_draft=num_draft)
            result = decoder.generate(prompt, max_tokens=40, ignore_eos=True)
            assert result.tokens == expected, (prompt, num_draft)
            accepted += result.stats.accepted
            drafted += result.stats.drafted
    rate = accepted / drafted
    print(f"{draft_name}: greedy acceptance {rate:.3f}")
    # The draft kinds really differ: partial, (almost) no and full agreement.
    expected_range = {"noisy": (0.2, 0.9), "unrelated": (0.0, 0.1), "self": (1.0, 1.0)}[draft_name]
    assert expected_range[0] <= rate <= expected_range[1]


def test_a_prompt_encoded_apart_from_its_keys_and_values_decodes_the_same(main, drafts, monkeypatch):
    # Past SEPARATE_ENCODER_BYTES of encoder bias (T5.cross_kv) the encoder is evaluated on its own first (its bias
    # then freed before the cross-attention keys and values are made): the same tokens, regular, speculative and in a
    # padded batch.
    model, tokenizer, _ = main
    together = [regular(main, prompt, max_tokens=12).tokens for prompt in PROMPTS[:3]]
    monkeypatch.setattr(model_module, "SEPARATE_ENCODER_BYTES", 0)
    apart = [regular(main, prompt, max_tokens=12).tokens for prompt in PROMPTS[:3]]
    speculative = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft=3)
    assert apart == together == [speculative.generate(p, max_tokens=12, ignore_eos=True).tokens for p in PROMPTS[:3]]
    batched = speculative.generate_batch(PROMPTS[:3], max_tokens=12, ignore_eos=True, batch_size=3)
    assert [generation.tokens for generation in batched] == together


@pytest.mark.parametrize("num_draft", [1, 2, 4, 7])
@pytest.mark.parametrize("max_tokens", [1, 5, 24])
def test_main_model_as_its_own_draft_accepts_everything(num_draft, max_tokens, main):
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, model, tokenizer, num_draft=num_draft)
    result = decoder.generate(PROMPTS[0], max_tokens=max_tokens, ignore_eos=True)
    assert len(result.tokens) == max_tokens
    assert result.stats.accepted == result.stats.drafted
    assert result.stats.main_calls == math.ceil(max_tokens / (num_draft + 1))


def test_delta_one_accepts_every_draft_and_acceptance_falls_with_delta(main, drafts):
    model, tokenizer, _ = main
    rates = []
    for delta in [1.0, 0.75, 0.5, 0.25, 0.0]:
        accepted = drafted = 0
        for seed, prompt in enumerate(PROMPTS):
            decoder = SpeculativeDecoder(model, drafts["unrelated"], tokenizer, num_draft=4, delta=delta, seed=seed)
            stats = decoder.generate(prompt, max_tokens=30, ignore_eos=True).stats
            accepted += stats.accepted
            drafted += stats.drafted
        rates.append(accepted / drafted)
    print("acceptance by delta 1 .. 0:", [round(r, 3) for r in rates])
    assert rates[0] == 1.0
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # This draft (almost) never agrees, so each draft survives with probability delta, and the i-th draft of a step
    # only with delta**i: the expected acceptance rate is sum(delta**i for i = 1..4) / 4.
    for rate, delta in zip(rates, [1.0, 0.75, 0.5, 0.25, 0.0]):
        assert abs(rate - sum(delta**i for i in range(1, 5)) / 4) < 0.1


def test_delta_one_output_is_the_drafts(main, drafts):
    # With every draft accepted, the drafted tokens are exactly the draft model's own greedy output.
    model, tokenizer, _ = main
    draft = drafts["noisy"]
    draft_alone = SpeculativeDecoder(draft, None, tokenizer).generate(PROMPTS[1], 20, regular=True, ignore_eos=True)
    decoder = SpeculativeDecoder(model, draft, tokenizer, num_draft=19, delta=1.0)
    result = decoder.generate(PROMPTS[1], max_tokens=20, ignore_eos=True)
    assert result.tokens[:19] == draft_alone.tokens[:19]


def test_eos_inside_the_drafts_stops_generation(main):
    model, tokenizer, path = main
    eos = model.args.eos_token_id
    reference = regular(main, PROMPTS[4], max_tokens=30).tokens
    # Make the main model (and so its own draft) end where it would first produce a token it has not produced before.
    position = next(i for i in range(3, len(reference)) if reference[i] not in reference[:i])
    eos_model, _, _ = load_model(path, decoding_layout=False)  # edits lm_head.weight below
    head = eos_model.lm_head.weight
    rows = mx.arange(head.shape[0])[:, None]
    eos_model.lm_head.weight = mx.where(rows == eos, head[reference[position]] * 1.5, head)
    eos_main = (eos_model, tokenizer, path)
    expected = SpeculativeDecoder(eos_model, None, tokenizer).generate(PROMPTS[4], 30, regular=True)
    assert expected.tokens[-1] == eos and len(expected.tokens) < 30
    for num_draft in [1, 3, 8]:
        result = SpeculativeDecoder(eos_model, eos_model, tokenizer, num_draft=num_draft).generate(PROMPTS[4], 30)
        assert result.tokens == expected.tokens
        # ignore_eos keeps going past it.
        longer = SpeculativeDecoder(eos_model, eos_model, tokenizer, num_draft=num_draft)
        assert len(longer.generate(PROMPTS[4], 30, ignore_eos=True).tokens) == 30
    assert regular(eos_main, PROMPTS[4], max_tokens=30).tokens[: len(expected.tokens)] == expected.tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 13])
def test_max_tokens_is_exact(max_tokens, main, drafts):
    model, tokenizer, _ = main
    for num_draft in [1, 3, 6]:
        decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft=num_draft, temperature=0.8)
        result = decoder.generate(PROMPTS[2], max_tokens=max_tokens, ignore_eos=True)
        assert len(result.tokens) == max_tokens == result.stats.generated


def test_same_seed_same_output(main, drafts):
    model, tokenizer, _ = main

    def run(seed):
        decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, temperature=1.0, seed=seed)
        return decoder.generate(PROMPTS[0], max_tokens=30, ignore_eos=True).tokens

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_streamed_text_adds_up_to_the_result(main, drafts):
    model, tokenizer, _ = main
    pieces = []
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft=3)
    result = decoder.generate(PROMPTS[0], max_tokens=25, ignore_eos=True, stream=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == result.text == tokenizer.decode(result.tokens, skip_special_tokens=True)


def test_vocabulary_mismatch_is_refused(main, converted):
    model, tokenizer, _ = main
    byte_model, byte_tokenizer, _ = load_model(converted("byt5"))
    with pytest.raises(IncompatibleDraftError):
        SpeculativeDecoder(model, byte_model, tokenizer, draft_tokenizer=byte_tokenizer)
    small = T5(ModelArgs(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(IncompatibleDraftError):
        SpeculativeDecoder(model, small, tokenizer)


@pytest.mark.parametrize(
    "option",
    [
        dict(num_draft=0),
        dict(num_draft="many"),
        dict(max_num_draft=0),
        dict(drafter="ngram"),
        dict(max_ngram=0),
        dict(delta=1.5),
        dict(delta=-0.1),
        dict(temperature=-1),
        dict(top_p=0.0),
    ],
)
def test_bad_options_are_refused(option, main):
    model, tokenizer, _ = main
    with pytest.raises(ValueError):
        SpeculativeDecoder(model, model, tokenizer, **option)


# --- Exactness of speculative sampling: the output distribution is the main model's. ---


class CountingTokenizer:
    """The few tokenizer calls the decoder makes, for a model with a tiny vocabulary."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [int(c) % self.size for c in text]})

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


def tiny_model(seed, vocab_size, sharpness):
    mx.random.seed(seed)
    args = ModelArgs(
        vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, tie_word_embeddings=False
    )
    model = T5(args)
    model.lm_head.weight = model.lm_head.weight * sharpness  # distributions far from uniform
    mx.eval(model.parameters())
    return model


def exact_marginals(model, prompt_ids, positions, distribution):
    """The main model's own distribution of the token at each of the first `positions` positions, by enumeration."""
    cross_kv = model.cross_kv(model.encode(prompt_ids))
    vocab = model.args.vocab_size
    prefixes = {(model.args.decoder_start_token_id,): 1.0}
    marginals = []
    for _ in range(positions):
        marginal = np.zeros(vocab)
        extended = {}
        for prefix, weight in prefixes.items():
            logits = model.decode(mx.array([prefix]), cross_kv, model.make_cache())[0, -1]
            probs = np.array(distribution(logits), dtype=np.float64)
            marginal += weight * probs
            for token in np.nonzero(probs)[0]:
                extended[prefix + (int(token),)] = weight * probs[token]
        marginals.append(marginal)
        prefixes = extended
    return marginals


def chi_square_critical(df, z=3.09):
    """The chi-square quantile for a false-failure rate of 1e-3 (z = 3.09), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts, expected_probs):
    expected = expected_probs * counts.sum()
    # Pool the cells with small expected counts into one, so the statistic is valid.
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    statistic = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    return statistic, int(keep.sum()) - 1


SAMPLES = 2000
POSITIONS = 3


def sampled_counts(main_model, draft_model, settings, delta=0.0, drafter="model", num_draft=2, positions=POSITIONS):
    tokenizer = CountingTokenizer(main_model.args.vocab_size)
    counts = np.zeros((positions, main_model.args.vocab_size))
    lookup_drafted = 0
    for seed in range(SAMPLES):
        decoder = SpeculativeDecoder(
            main_model, draft_model, tokenizer, num_draft, delta, seed=seed, drafter=drafter, **settings
        )
        result = decoder.generate("31415", max_tokens=positions, ignore_eos=True)
        counts[np.arange(positions), result.tokens] += 1
        lookup_drafted += result.stats.lookup_drafted
    return counts, lookup_drafted


SETTINGS = {
    "temperature": dict(temperature=1.0),
    "top-k": dict(temperature=0.7, top_k=4),
    "top-p": dict(temperature=1.3, top_p=0.8),
}


@pytest.fixture(scope="module")
def sampling_pair():
    return tiny_model(seed=10, vocab_size=12, sharpness=4.0), tiny_model(seed=11, vocab_size=12, sharpness=4.0)


CASES = [(setting, "model", 2) for setting in SETTINGS] + [
    ("temperature", "lookup", 2),
    ("top-p", "hybrid", 2),
    ("top-k", "hybrid", "auto"),
]


class SteadyClock:
    """time.perf_counter for the decoder: a millisecond per reading, so that auto's choices do not follow the load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1e-3
        return self.now


@pytest.mark.parametrize("setting, drafter, num_draft", CASES)
def test_speculative_sampling_matches_the_main_models_distribution(
    setting, drafter, num_draft, sampling_pair, monkeypatch
):
    # Each position is a chi-square test at a false-failure rate of 1e-3 (3 positions x 6 cases: < 2% for the
    # suite); seeds are fixed, and auto's step times too, so the outcome is deterministic. A lookup draft is
    # deterministic (q one-hot); plain steps find a lookup's match a token late (the next is built before the last is
    # known), so its first drafts come at the fourth position, one more than the others test.
    monkeypatch.setattr(decoder_module, "time", SteadyClock())
    main_model, draft_model = sampling_pair
    settings = SETTINGS[setting]
    positions = POSITIONS + (drafter == "lookup")
    decoder = SpeculativeDecoder(main_model, None, CountingTokenizer(12), **settings)
    marginals = exact_marginals(main_model, mx.array([[3, 1, 4, 1, 5]]), positions, decoder.sampler.distribution)
    counts, lookup_drafted = sampled_counts(
        main_model, draft_model, settings, drafter=drafter, num_draft=num_draft, positions=positions
    )
    if num_draft != "auto":  # (auto, over 3 tokens, seldom tries a lookup)
        assert (lookup_drafted > 0) == (drafter != "model")
    for position in range(positions):
        # Tokens the distribution forbids (outside top-k / top-p) have no cell in the statistic: never drawn at all.
        forbidden = marginals[position] == 0
        assert counts[position][forbidden].sum() == 0, f"position {position + 1} drew forbidden tokens"
        statistic, df = chi_square(counts[position], marginals[position])
        print(
            f"{setting} {drafter} position {position + 1}: chi2 {statistic:.1f}, df {df}, "
            f"critical {chi_square_critical(df):.1f}"
        )
        assert statistic < chi_square_critical(df)


def test_the_sampling_check_detects_a_biased_sampler(sampling_pair):
    # delta = 1 keeps every draft, so the first tokens follow the draft model: the same check must reject it.
    main_model, draft_model = sampling_pair
    settings = SETTINGS["temperature"]
    decoder = SpeculativeDecoder(main_model, None, CountingTokenizer(12), **settings)
    marginals = exact_marginals(main_model, mx.array([[3, 1, 4, 1, 5]]), 1, decoder.sampler.distribution)
    counts, _ = sampled_counts(main_model, draft_model, settings, delta=1.0)
    statistic, df = chi_square(counts[0], marginals[0])
    assert statistic > chi_square_critical(df)


def test_draft_models_have_distinct_weights(drafts):
    # Guard for the fixtures above: the noisy draft is not the main model.
    noisy = dict(tree_flatten(drafts["noisy"].parameters()))
    same = dict(tree_flatten(drafts["self"].parameters()))
    assert any(not mx.array_equal(noisy[name], same[name]) for name in noisy)


def test_prompts_are_tokenized_as_the_tokenizer_does(tokenizer_dir):
    """generation.tokenize: the fast backend's ids where transformers only hands it the text, the tokenizer's own call
    otherwise (a truncation left set on the backend by an earlier call); the same ids for special tokens in the text,
    spaces, other scripts and the empty string."""
    from transformers import AutoTokenizer

    from generation import tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = PROMPTS + ["", "  two spaces  ", "a </s> inside <pad>", "Grüße, Straße: 12 Äpfel\tund\nÖl", "x" * 300]
    assert all(tokenize(tokenizer, text) == tokenizer(text).input_ids for text in texts)
    tokenizer(PROMPTS[0], truncation=True, max_length=3)  # leaves the backend truncating
    assert tokenizer.backend_tokenizer.truncation is not None
    assert tokenize(tokenizer, PROMPTS[0]) == tokenizer(PROMPTS[0]).input_ids
    assert len(tokenize(tokenizer, PROMPTS[0])) > 3


def test_the_streaming_detokenizer_gives_the_tokenizers_own_text(tokenizer_dir):
    """generation.detokenizer: the fast backend's decode where transformers adds nothing, tokenizer.decode otherwise;
    the same text for ids with special tokens, unknown pieces and every id of the vocabulary."""
    from transformers import AutoTokenizer

    from generation import detokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.is_fast and not tokenizer.clean_up_tokenization_spaces
    rng = np.random.default_rng(0)
    sequences = [tokenizer(p).input_ids for p in PROMPTS] + [
        list(rng.integers(0, len(tokenizer), 40)) for _ in range(50)
    ]
    sequences = [[int(i) for i in ids] for ids in sequences] + [list(range(len(tokenizer)))]
    fast = detokenizer(tokenizer)
    assert all(fast(ids) == tokenizer.decode(ids, skip_special_tokens=True) for ids in sequences)
    # With transformers' clean-up of spaces on, the tokenizer decodes: " ." joined as it would.
    tokenizer.clean_up_tokenization_spaces = True
    text = tokenizer("a , b .").input_ids
    cleaned = tokenizer.decode(text, skip_special_tokens=True)
    assert cleaned != tokenizer.backend_tokenizer.decode(text, skip_special_tokens=True)
    assert detokenizer(tokenizer)(text) == cleaned
