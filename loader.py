"""Load a directory written by convert.py: the config, the weights (names and shapes checked) and the tokenizer."""

import backend  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from model import T5, ModelArgs


class ModelLoadError(Exception):
    """A converted model directory that cannot be loaded (missing, incomplete or corrupt)."""


def weight_files(path: Path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e})") from None
        return [path / name for name in names]
    return [path / "model.safetensors"]


def load_weights(path: Path) -> dict:
    weights = {}
    for file in weight_files(path):
        if not file.exists():
            raise ModelLoadError(f"{file} is missing")
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # mx.load raises bare RuntimeError/ValueError on truncated files
            raise ModelLoadError(f"{file} is truncated or corrupt ({e})") from None
    return weights


def load_model(path, lazy: bool = False, decoding_layout: Optional[bool] = None):
    """Load a directory written by convert.py -> (model, tokenizer, config dict).

    Every weight's name and shape is checked against the model; problems raise ModelLoadError. `decoding_layout`
    (default: for float32 weights when MLX runs on the CPU) holds the decoder's weights transposed and fused for speed.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} is not a converted model directory (no config.json)")
    config = json.loads(config_file.read_text())
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: {e}") from None
    model = T5(args)
    weights = load_weights(path)

    quantization = (config.get("mlx") or {}).get("quantization")
    if quantization:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda name, module: f"{name}.scales" in weights,
        )
    check_weights(model, weights, path)
    model.load_weights(list(weights.items()), strict=True)
    if decoding_layout is None:
        decoding_layout = mx.default_device() == mx.cpu and all(w.dtype == mx.float32 for w in weights.values())
    if decoding_layout:
        model.use_decoding_layout()
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, load_tokenizer(path), config


def check_weights(model, weights, path):
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelLoadError(f"weights in {path} do not match its config: {detail}; convert it again")
    for name, array in expected.items():
        if weights[name].shape != array.shape:
            raise ModelLoadError(
                f"{path}: {name} has shape {weights[name].shape}, expected {array.shape}; convert it again"
            )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise ModelLoadError(f"cannot load the tokenizer in {path} ({e})") from None
