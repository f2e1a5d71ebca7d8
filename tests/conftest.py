"""Shared fixtures: a SentencePiece tokenizer trained in the session and tiny random transformers T5 checkpoints.

Pretrained weights cannot be downloaded here, so every reference is built locally; nothing touches the network.
"""

import json
import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --num-draft auto's step costs and acceptance go to a directory of the test run's own, never the user's cache.
os.environ["T5_SPECULATIVE_CACHE"] = tempfile.mkdtemp(prefix="t5-speculative-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

import blas  # noqa: E402, F401  (before mlx: loads an optimized BLAS on Linux)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import kernels  # noqa: E402
from loader import load_model  # noqa: E402
from tools.t5_tokenizer import train_t5_tokenizer  # noqa: E402

# Tiny configs covering each T5 variant transformers' T5ForConditionalGeneration loads.
VARIANTS = {
    # v1.0: relu, tied embeddings, decoder output scaled before the tied head.
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # v1.1 / flan-t5: gated-gelu (tanh approximation), untied head, no scaling.
    "t5-v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": dict(model_type="mt5", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # byt5: byte vocabulary, a deeper encoder than decoder.
    "byt5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=1),
    # t5-3b / t5-11b shape: num_heads * d_kv != d_model; custom buckets, distance and epsilon.
    "t5-3b-shape": dict(
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        d_kv=16,
        num_decoder_layers=3,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=20,
        layer_norm_epsilon=1e-5,
    ),
    # Other activations transformers accepts: exact gelu and gated silu.
    "gelu": dict(feed_forward_proj="gelu", tie_word_embeddings=True),
    "gated-silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
}

BASE_CONFIG = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)

TRAINING_TEXT_LIMIT = 40_000


def training_text():
    """A few dozen KB of English and code-like text that ships with Python itself."""
    from pydoc_data import topics

    return "\n".join(topics.topics.values())[:TRAINING_TEXT_LIMIT]


@pytest.fixture
def fused():
    """Sets whether layers run natively (kernels.fused_layers), for one test; restores the setting after it."""
    before = kernels.fused_layers
    yield lambda on: setattr(kernels, "fused_layers", on)
    kernels.fused_layers = before


@pytest.fixture
def isa():
    """Sets the instruction set the native kernels run on (kernels.native.set_isa), for one test; restores it after."""
    before = kernels.native.isa()
    yield kernels.native.set_isa
    kernels.native.set_isa(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """An HF T5Tokenizer (250 SentencePiece pieces + 100 sentinel ids) saved to a directory."""
    path = tmp_path_factory.mktemp("tokenizer")
    train_t5_tokenizer(training_text().splitlines(), 250, character_coverage=1.0).save_pretrained(path)
    return path


def save_checkpoint(path, variant, tokenizer_dir, seed=0, **overrides):
    """Write a random-initialised transformers checkpoint of `variant` in HF layout to `path`."""
    from transformers import (
        ByT5Tokenizer,
        MT5Config,
        MT5ForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    spec = {**BASE_CONFIG, **VARIANTS[variant], **overrides}
    tied = spec.pop("tie_word_embeddings")
    is_mt5 = spec.pop("model_type", "t5") == "mt5"
    config_class, model_class = (
        (MT5Config, MT5ForConditionalGeneration) if is_mt5 else (T5Config, T5ForConditionalGeneration)
    )
    torch.manual_seed(seed)
    model = model_class(config_class(**spec))
    model.save_pretrained(path)
    if not tied:
        # transformers 5 saves T5 tied; a v1.1 checkpoint carries its own lm_head and says tie_word_embeddings=false.
        weights = load_file(path / "model.safetensors")
        weights["lm_head.weight"] = torch.randn(spec["vocab_size"], spec["d_model"]) * spec["d_model"] ** -0.5
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps(config, indent=2))
    if variant == "byt5":
        ByT5Tokenizer().save_pretrained(path)
    else:
        for file in tokenizer_dir.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer_dir):
    """Factory: (variant, seed, config overrides) -> directory of a tiny random HF checkpoint (built once)."""
    built = {}

    def build(variant, seed=0, **overrides):
        key = (variant, seed, tuple(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"hf-{variant}")
            built[key] = save_checkpoint(path, variant, tokenizer_dir, seed=seed, **overrides)
        return built[key]

    return build


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory, hf_checkpoint):
    """Factory: variant -> hf_checkpoint(variant) saved in bfloat16, as transformers saves a bfloat16 model (built
    once; a model of its own, so that the float32 references stay float32)."""
    from transformers import AutoModelForSeq2SeqLM

    built = {}

    def build(variant):
        if variant not in built:
            source = tmp_path_factory.mktemp(f"hf-{variant}-bf16")
            model = AutoModelForSeq2SeqLM.from_pretrained(hf_checkpoint(variant))
            model.to(torch.bfloat16).save_pretrained(source)
            for file in hf_checkpoint(variant).glob("*token*"):
                (source / file.name).write_bytes(file.read_bytes())
            built[variant] = source
        return built[variant]

    return build


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_checkpoint):
    """Factory: (variant, seed, convert options) -> directory written by convert.py (built once per session)."""
    import convert

    built = {}

    def build(variant, seed=0, **options):
        key = (variant, seed, tuple(sorted(options.items())))
        if key not in built:
            out = tmp_path_factory.mktemp("mlx") / variant
            convert.convert(str(hf_checkpoint(variant, seed=seed)), mlx_path=str(out), **options)
            built[key] = out
        return built[key]

    return build


@pytest.fixture(scope="session")
def hf_model():
    """Factory: checkpoint directory -> transformers model loaded the way a user loads it."""
    from transformers import AutoModelForSeq2SeqLM

    loaded = {}

    def load(path):
        if path not in loaded:
            loaded[path] = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        return loaded[path]

    return load


# The decoding tests' prompts and models: a main model and drafts that agree with it more or less often.

PROMPTS = [
    "translate English to German: The house is wonderful.",
    "summarize: the function returns a list of the values",
    "class attributes are looked up in the dictionary",
    "a",
    "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list)",
    "if x < 0: raise ValueError",
]


def perturbed(path, noise, seed):
    """The model at `path` with gaussian noise on every weight: a draft that agrees with it only part of the time."""
    copy, _, _ = load_model(path)
    mx.random.seed(seed)
    copy.update(tree_map(lambda w: w + noise * mx.std(w) * mx.random.normal(w.shape), copy.parameters()))
    mx.eval(copy.parameters())
    return copy


@pytest.fixture(scope="module")
def main(converted):
    # An untied random model: its greedy output varies (tied random T5s tend to repeat one token).
    path = converted("t5-v1_1")
    model, tokenizer, _ = load_model(path)
    return model, tokenizer, path


@pytest.fixture(scope="module")
def drafts(main, converted):
    """Drafts of the main model by how often they agree with it: a noisy copy, an unrelated model, itself."""
    unrelated, _, _ = load_model(converted("t5-v1_1", seed=1))
    return {"noisy": perturbed(main[2], 0.04, seed=0), "unrelated": unrelated, "self": main[0]}
