"""Load a directory written by convert.py: the config, the weights (names and shapes checked) and the tokenizer.

Every file is checked before it is used (checks.py), so that a directory that is incomplete, damaged or not a
conversion at all (a transformers checkpoint) is reported as such, with the command that fixes it.
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import json
import math
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from checks import (
    BrokenFile,
    check_sizes,
    check_tokenizer_files,
    convert_command,
    read_config,
    read_json,
    reconvert_command,
    transformers_checkpoint,
    weight_headers,
)
from model import T5, ModelArgs


class ModelLoadError(Exception):
    """A directory that cannot be loaded; the message says what is wrong and the command that fixes it."""


def load_model(path, lazy: bool = False, decoding_layout: Optional[bool] = None, group=None):
    """Load a directory written by convert.py -> (model, tokenizer, config dict).

    Every file is checked first (JSON, safetensors headers against file sizes, weight names, shapes and dtypes
    against the config, the tokenizer's vocabulary); problems raise ModelLoadError. `decoding_layout` (default: when
    MLX runs on the CPU, in every dtype) computes the linear layers with `kernels.linear`, fused. With a distributed
    `group` of several ranks the model is sharded across them (T5.shard) and this rank reads only its own slices of
    the weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is not a directory; convert a checkpoint into it with: "
            f"python convert.py --model <checkpoint> --mlx-path {path}"
        )
    checkpoint = transformers_checkpoint(path)
    if checkpoint:
        raise ModelLoadError(f"{path} is {checkpoint}, not converted for MLX; convert it with: {convert_command(path)}")
    try:
        config = read_config(path)
        model, weights = read_weights(path, config, group)
        tokenizer = read_tokenizer(path, config)
    except BrokenFile as e:
        raise ModelLoadError(f"{e}; convert it again with: {reconvert_command(path)}") from None

    model.load_weights(list(weights.items()), strict=True)
    del weights  # the model's own references only: a layer packed in place frees MLX's layout as it goes
    if decoding_layout is None:
        decoding_layout = mx.default_device() == mx.cpu
    if decoding_layout:
        model.use_decoding_layout()
    if not lazy:
        mx.eval(model.parameters())
        if decoding_layout:
            model.pack_quantized_in_place()
            model.pack_for_kernels()
    model.eval()
    return model, tokenizer, config


def read_weights(path: Path, config: dict, group=None) -> tuple[T5, dict]:
    """The model `config` describes, shaped (quantized) like the weights, and the weights, all checked; sharded over
    `group` when it has several ranks, with only this rank's slices of the weights."""
    files, headers = weight_headers(path, config)
    check_sizes(config, {name: shape for name, (_, shape) in headers.items()})
    quantization = config["mlx"]["quantization"]
    model = T5(ModelArgs.from_dict(config))
    if quantization:
        try:
            nn.quantize(
                model,
                group_size=quantization["group_size"],
                bits=quantization["bits"],
                class_predicate=lambda name, module: f"{name}.scales" in headers,
            )
        except ValueError as e:
            raise BrokenFile(f"{path}: the quantized weights do not fit the model in config.json ({e})") from None
    expected = {name: tuple(array.shape) for name, array in tree_flatten(model.parameters())}
    missing, unexpected = sorted(set(expected) - set(headers)), sorted(set(headers) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise BrokenFile(f"weights in {path} do not match its config: {detail}")
    for name, shape in expected.items():
        if headers[name][1] != shape:
            raise BrokenFile(f"{path}: {name} has shape {headers[name][1]}, config.json implies {shape}")

    if group is not None and group.size() > 1:
        try:
            model.shard(group)
        except ValueError as e:
            raise ModelLoadError(
                f"{path} cannot be split across {group.size()} ranks ({e}); launch a number of ranks that divides the "
                "attention heads and the feed-forward units"
            ) from None
        return model, read_rank_slices(files, model, group.rank(), group.size())

    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # mx.load raises bare RuntimeError/ValueError on damaged files
            raise BrokenFile(f"{file} is truncated or corrupt ({e})") from None
    return model, weights


# safetensors dtypes as numpy reads their bytes (numpy has no bfloat16: its bits as uint16).
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}


def read_rank_slices(files, model, rank: int, ranks: int) -> dict:
    """This rank's slice of each weight of the sharded `model`, read from the (checked) files and nothing more.

    A weight the model holds whole is read whole; one it holds 1/ranks of along an axis, as the rank-th block along
    that axis: rows straight from the file, columns a few MB of rows at a time.
    """
    parameters = dict(tree_flatten(model.parameters()))
    weights = {}
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                dtype, shape = np.dtype(NUMPY_DTYPES[entry["dtype"]]), entry["shape"]
                split = [axis for axis, size in enumerate(parameters[name].shape) if size != shape[axis]]
                offset = 8 + length + entry["data_offsets"][0]
                data = read_block(f, offset, dtype, shape, split[0] if split else None, rank, ranks)
                weights[name] = mx.array(data).view(mx.bfloat16) if entry["dtype"] == "BF16" else mx.array(data)
    return weights


def read_block(f, offset: int, dtype, shape: list, axis: Optional[int], index: int, parts: int):
    """Block `index` of `parts` along `axis` (None: all of it) of the row-major tensor at `offset` in file `f`."""
    rows = shape[0] if shape else 1
    row = math.prod(shape[1:])  # elements per row
    if axis is None or axis == 0:
        block, first = (rows // parts, index * rows // parts) if axis == 0 else (rows, 0)
        f.seek(offset + first * row * dtype.itemsize)
        return np.fromfile(f, dtype, block * row).reshape(block, *shape[1:])
    # A block of columns of a matrix: whole rows a few MB at a time, of which this block's columns are kept.
    columns = shape[1] // parts
    out = np.empty((rows, columns), dtype)
    chunk = max(1, (4 << 20) // (row * dtype.itemsize))
    f.seek(offset)
    for start in range(0, rows, chunk):
        count = min(chunk, rows - start)
        data = np.fromfile(f, dtype, count * row).reshape(count, row)
        out[start : start + count] = data[:, index * columns : (index + 1) * columns]
    return out


# The tokenizer classes that AutoTokenizer picks for T5 checkpoints, by the name tokenizer_config.json gives (none:
# config.json's model_type decides), and the modules that define them. Importing a class from its own module leaves
# out what AutoTokenizer imports to read config.json: PyTorch, about 190 MB resident and a second or two of start-up.
T5_TOKENIZERS = {
    "T5Tokenizer": ("transformers.models.t5.tokenization_t5", "T5Tokenizer"),
    "T5TokenizerFast": ("transformers.models.t5.tokenization_t5", "T5Tokenizer"),
    "ByT5Tokenizer": ("transformers.models.byt5.tokenization_byt5", "ByT5Tokenizer"),
}


def tokenizer_class(path: Path, config: dict):
    """The class that AutoTokenizer would load the tokenizer in `path` with, where it is one of T5's; else
    AutoTokenizer itself."""
    import importlib

    tokenizer_config = path / "tokenizer_config.json"
    name = read_json(tokenizer_config).get("tokenizer_class") if tokenizer_config.exists() else None
    if name is None and config.get("model_type") == "t5":
        name = "T5Tokenizer"
    if name in T5_TOKENIZERS:
        module, attribute = T5_TOKENIZERS[name]
        return getattr(importlib.import_module(module), attribute)
    from transformers import AutoTokenizer

    return AutoTokenizer


def read_tokenizer(path: Path, config: dict):
    """The tokenizer saved in `path`, and nothing else: transformers would build an empty one from config.json."""
    check_tokenizer_files(path)
    try:
        tokenizer = tokenizer_class(path, config).from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise BrokenFile(f"cannot load the tokenizer in {path} ({e})") from None
    if len(tokenizer) > config["vocab_size"]:
        raise BrokenFile(
            f"the tokenizer in {path} has {len(tokenizer)} tokens, more than the model's vocab_size "
            f"{config['vocab_size']}: it belongs to another model"
        )
    return tokenizer
