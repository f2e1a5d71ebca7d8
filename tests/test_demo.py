"""The bundled demo pair (models/demo): an English-German translation pair, converted and run the way a user runs it."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ROOT

import convert
import step_costs
from decoder import DRAFTERS, SpeculativeDecoder
from loader import load_model
from tools import demo_data

DEMO_DIR = ROOT / "models" / "demo"
EXAMPLES = [json.loads(line) for line in (DEMO_DIR / "prompts.txt").read_text().splitlines()]
PROMPTS = [example["prompt"] for example in EXAMPLES]
TOLERANCE = 1e-4  # max abs difference of the logits, float32
SEED_PROMPT = "translate English to German: The house is wonderful."


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """{"main": (model, tokenizer, config), "draft": ...}, converted by convert.py into a temporary dir."""
    out = tmp_path_factory.mktemp("demo")
    return {
        role: load_model(convert.convert(str(DEMO_DIR / role), mlx_path=str(out / role))) for role in ("main", "draft")
    }


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(DEMO_DIR / "main", dtype=torch.float32).eval()


def test_the_pair_is_small_and_shares_one_vocabulary(demo):
    size = sum(file.stat().st_size for file in DEMO_DIR.rglob("*") if file.is_file())
    assert size <= 60 * 2**20
    (main, tokenizer, _), (draft, draft_tokenizer, _) = demo["main"], demo["draft"]
    assert tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    assert main.args.vocab_size == draft.args.vocab_size >= len(tokenizer)
    # German letters are pieces of the vocabulary, not unknown tokens.
    assert tokenizer.unk_token_id not in tokenizer("Die Brücke über den Fluss ist schön.").input_ids
    assert len(PROMPTS) == 100 and all(prompt.startswith("translate English to German: ") for prompt in PROMPTS)
    # Every shipped prompt is held out: the training data never had it.
    assert all(demo_data.is_held_out(prompt.removeprefix(demo_data.PREFIX)) for prompt in PROMPTS)
    # The draft is much cheaper per token: one decoder layer against the main model's eight (of the same width, so
    # that it starts from the main model's weights).
    assert draft.args.num_decoder_layers * 8 <= main.args.num_decoder_layers


def test_logits_and_greedy_output_match_transformers(demo, reference):
    model, tokenizer, _ = demo["main"]
    batch = tokenizer(PROMPTS[:3], padding=True, return_tensors="pt")
    decoder_ids = torch.tensor([[0] + tokenizer(prompt).input_ids[:10] for prompt in PROMPTS[3:6]])
    with torch.no_grad():
        expected = reference(**batch, decoder_input_ids=decoder_ids).logits
    logits = model(*(mx.array(t.numpy()) for t in (batch.input_ids, decoder_ids, batch.attention_mask)))
    difference = np.abs(np.array(logits) - expected.numpy()).max()
    print(f"demo main: logits differ by at most {difference:.1e} (largest logit {expected.abs().max():.1f})")
    assert difference <= TOLERANCE

    decoder = SpeculativeDecoder(model, None, tokenizer)
    for prompt in PROMPTS[:2]:
        with torch.no_grad():
            generated = reference.generate(
                # No cache: transformers sizes generate()'s cache by the encoder's layer count, not the decoder's (8).
                **tokenizer(prompt, return_tensors="pt"),
                max_new_tokens=100,
                do_sample=False,
                use_cache=False,
            )
        assert decoder.generate(prompt, regular=True).tokens == generated[0, 1:].tolist()


def test_the_main_model_translates_held_out_sentences(demo):
    model, tokenizer, _ = demo["main"]
    decoder = SpeculativeDecoder(model, None, tokenizer)
    assert decoder.generate(SEED_PROMPT, regular=True).text == "Das Haus ist wunderbar."
    examples = EXAMPLES[:40]
    exact = sum(decoder.generate(e["prompt"], regular=True).text == e["reference"] for e in examples) / len(examples)
    # 98% over the first 50 held-out prompts, 99.7% over 300 other held-out sentences (models/demo/README.md)
    assert exact >= 0.9


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("num_draft", [1, 4, "auto"])
def test_speculative_greedy_equals_regular_greedy(demo, drafter, num_draft):
    (model, tokenizer, _), (draft, _, _) = demo["main"], demo["draft"]
    decoder = SpeculativeDecoder(model, draft, tokenizer, num_draft=num_draft, drafter=drafter)
    for prompt in PROMPTS[:4]:
        regular = decoder.generate(prompt, regular=True)
        speculative = decoder.generate(prompt)
        assert len(regular.tokens) >= 5  # a sentence: room to speculate
        assert speculative.tokens == regular.tokens and speculative.text == regular.text


def test_acceptance_rate_is_realistic(demo):
    (model, tokenizer, _), (draft, _, _) = demo["main"], demo["draft"]
    decoder = SpeculativeDecoder(model, draft, tokenizer, num_draft=1)
    runs = [decoder.generate(prompt).stats for prompt in PROMPTS[:10]]
    # With one draft per call: how often the draft's greedy choice is the main model's (0.969 over the first 50
    # held-out prompts). Untrained pairs sit near 0, or near 1 where both only repeat one token.
    rate = sum(stats.accepted for stats in runs) / sum(stats.drafted for stats in runs)
    assert 0.85 <= rate <= 0.995


def test_bare_command_runs_the_demo_pair(tmp_path):
    # A fresh directory: no mlx_models/, and main.py found by its absolute path as from any other directory.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args):
        command = [sys.executable, str(ROOT / "main.py"), *args]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout), result.stderr

    first, stderr = run("--json", "-m", "24")
    assert "bundled demo pair" in stderr and "python convert.py --model t5-11b" in stderr
    assert "converting" in stderr and "Traceback" not in stderr
    assert (first["model"], first["draft_model"]) == ("mlx_models/demo-main", "mlx_models/demo-draft")
    # The seed's own prompt, translated; the draft length is chosen step by step unless given.
    assert first["prompt"] == SEED_PROMPT and first["text"] == "Das Haus ist wunderbar."
    assert first["settings"]["num_draft"] == "auto"
    drafted, stderr = run("--json", "-m", "24", "--num-draft", "3")
    assert drafted["text"] == first["text"] and drafted["stats"]["drafted"] > 0

    # Converted once, and again where the bundled weights are newer than the conversion (here: made older).
    os.utime(tmp_path / "mlx_models" / "demo-main" / "config.json", (0, 0))
    second, stderr = run("--json", "-m", "24", "--regular-decode", "--num-draft", "3", "--prompt", PROMPTS[0])
    assert "converting the demo pair into mlx_models/demo-main\n" in stderr
    assert second["text"] == EXAMPLES[0]["reference"] and second["draft_model"] is None
    assert second["settings"]["num_draft"] == 3


def test_auto_drafts_from_the_first_prompt_with_a_decoder_per_prompt(demo, tmp_path, monkeypatch):
    # As main.py runs: a new decoder for each prompt, one cache directory. At the prior of 0.5 plain steps look best;
    # a source never tried is tried at once, and what pays for tries carries over from run to run, so the pair drafts
    # from the first prompt on (it took no draft at all when a run of a few dozen steps had to pay for a try alone).
    monkeypatch.setenv(step_costs.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(step_costs, "warned", set())
    monkeypatch.setattr(step_costs, "pending", {})
    monkeypatch.setattr(step_costs, "last_written", {})
    (main, tokenizer, _), (draft, _, _) = demo["main"], demo["draft"]
    drafted, generated = [], []
    for prompt in PROMPTS[:6]:
        decoder = SpeculativeDecoder(main, draft, tokenizer, num_draft="auto")
        generation = decoder.generate(prompt, max_tokens=60)
        assert generation.tokens == decoder.generate(prompt, max_tokens=60, regular=True).tokens
        drafted.append(generation.stats.drafted)
        generated.append(generation.stats.generated)
    assert drafted[0] > 0, drafted
    assert sum(drafted[3:]) >= sum(generated[3:]) / 2, (drafted, generated)
