"""Check a directory before it is loaded, from its files alone: config.json (keys and the type of every value), the
safetensors headers against the files' sizes and the index, the dtypes and quantization against the config, and the
tokenizer files; and recognise what a directory is when it is not a conversion (a transformers checkpoint), with the
convert.py command that fixes it.
"""

import json
import math
import re
import struct
from dataclasses import fields
from pathlib import Path
from typing import Optional, Union, get_args, get_origin

from model import ModelArgs

# The tokenizer's files (and generation settings) that convert.py copies beside the weights.
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "added_tokens.json",
    "generation_config.json",
]
# Keys every config.json that convert.py writes has: they set the shapes of the weights.
CONFIG_KEYS = ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj", "mlx"]
TOKEN_IDS = {"decoder_start_token_id", "eos_token_id", "pad_token_id"}
# Safetensors dtypes convert.py writes, and their sizes in bytes.
TENSOR_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
QUANTIZATION = {"bits": (2, 3, 4, 5, 6, 8), "group_size": (32, 64, 128)}
# What convert.py writes into its output directory, and nothing else.
OUTPUT_FILES = re.compile(
    r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors|"
    + "|".join(map(re.escape, TOKENIZER_FILES))
)
VOCABULARY_FILES = ["tokenizer.json", "spiece.model"]


class BrokenFile(Exception):
    """A file of a converted directory that is missing, damaged or inconsistent with the others."""


def read_json(file: Path, what: str = "a JSON object"):
    if not file.is_file():
        raise BrokenFile(f"{file} is missing")
    try:
        value = json.loads(file.read_text())
    except OSError as e:
        raise BrokenFile(f"{file} cannot be read ({e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BrokenFile(f"{file} is {'empty' if not file.stat().st_size else 'not valid JSON'} ({e})") from None
    if not isinstance(value, dict):
        raise BrokenFile(f"{file} is not {what}")
    return value


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    config = read_json(config_file, "a JSON object (a model config)")
    missing = [key for key in CONFIG_KEYS if config.get(key) is None]
    if missing:
        raise BrokenFile(f"{config_file} lacks {', '.join(missing)}")
    for f in fields(ModelArgs):
        problem = f.init and config.get(f.name) is not None and value_problem(f.name, f.type, config[f.name])
        if problem:
            raise BrokenFile(f"{config_file}: {f.name} {problem}, got {config[f.name]!r}")
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise BrokenFile(f"{config_file}: {e}") from None
    for name in sorted(TOKEN_IDS):
        if getattr(args, name) >= args.vocab_size:
            raise BrokenFile(f"{config_file}: {name} {getattr(args, name)} is not below vocab_size {args.vocab_size}")
    mlx = config["mlx"]
    quantization = mlx.get("quantization") if isinstance(mlx, dict) else None
    if not isinstance(mlx, dict) or mlx.get("dtype") not in DTYPE_NAMES:
        raise BrokenFile(f"{config_file}: mlx must say the dtype ({', '.join(DTYPE_NAMES)}), got {mlx!r}")
    if quantization is not None and not (
        isinstance(quantization, dict)
        and all(
            type(quantization.get(key)) is int and quantization[key] in allowed for key, allowed in QUANTIZATION.items()
        )
    ):
        raise BrokenFile(f"{config_file}: mlx.quantization must be null or bits and group_size, got {quantization!r}")
    if quantization and quantization.get("scales_dtype", mlx["dtype"]) not in DTYPE_NAMES:
        raise BrokenFile(f"{config_file}: mlx.quantization.scales_dtype must be a float dtype, got {quantization!r}")
    fp32_modules = mlx.get("fp32_modules") or []
    if not (isinstance(fp32_modules, list) and all(isinstance(module, str) for module in fp32_modules)):
        raise BrokenFile(f"{config_file}: mlx.fp32_modules must be a list of module names, got {fp32_modules!r}")
    if mlx.get("linear_dtype") not in (None, "bfloat16") or (mlx.get("linear_dtype") and mlx["dtype"] != "float32"):
        raise BrokenFile(f"{config_file}: mlx.linear_dtype must be absent or bfloat16 (with float32), got {mlx!r}")
    if mlx.get("embedding_dtype") not in (None, "bfloat16") or (
        mlx.get("embedding_dtype") and not mlx.get("linear_dtype")
    ):
        raise BrokenFile(
            f"{config_file}: mlx.embedding_dtype must be absent or bfloat16 (with linear_dtype), got {mlx!r}"
        )
    return config


def is_linear_weight(name: str, shape) -> bool:
    """Whether the MLX tensor `name` is the matrix of a linear layer: in an encoder or decoder layer, or an untied head
    (not an embedding, the position bias or a norm)."""
    return len(shape) == 2 and (name == "lm_head.weight" or ".layers." in name and name.endswith(".weight"))


def value_problem(name: str, annotation, value) -> Optional[str]:
    """What is wrong with `value` for the ModelArgs field `name` of type `annotation`; None if nothing."""
    if get_origin(annotation) is Union:  # Optional[X]
        annotation = get_args(annotation)[0]
    if name == "eos_token_id" and isinstance(value, list) and value:  # transformers allows several
        value = value[0]
    if annotation is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if annotation is str:
        return None if isinstance(value, str) else "must be a string"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return None if ok else "must be a positive number"
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be an integer"
    if name in TOKEN_IDS:
        return None if value >= 0 else "must be a token id (0 or more)"
    return None if value >= 1 else "must be at least 1"


def safetensors_header(file: Path) -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape)}) of a safetensors file, checked against the file's size."""
    if not file.is_file():
        raise BrokenFile(f"{file} is missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BrokenFile(f"{file} is {'empty' if not size else 'truncated'} ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise BrokenFile(f"{file} is truncated or not a safetensors file (a header of {length} bytes)")
            header = json.loads(f.read(length))
    except OSError as e:
        raise BrokenFile(f"{file} cannot be read ({e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BrokenFile(f"{file} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise BrokenFile(f"{file} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = metadata if isinstance(metadata, dict) else {}
    tensors, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            nbytes = math.prod(shape) * TENSOR_DTYPES[dtype] if dtype in TENSOR_DTYPES else stop - start
            valid = all(isinstance(n, int) and n >= 0 for n in (*shape, start, stop))
        except (TypeError, ValueError, KeyError):
            valid = False
        if not valid:
            raise BrokenFile(f"{file} has a corrupt safetensors header (entry {name!r}: {entry!r})")
        if dtype not in TENSOR_DTYPES:
            raise BrokenFile(f"{file}: {name} has dtype {dtype}, which convert.py never writes")
        if stop - start != nbytes:
            raise BrokenFile(f"{file}: the header gives {name} {stop - start} bytes, {dtype} {shape} needs {nbytes}")
        tensors[name] = (dtype, tuple(shape))
        end = max(end, stop)
    data = size - 8 - length
    if data != end:
        state = "truncated" if data < end else "longer than its header says"
        raise BrokenFile(f"{file} is {state} ({data} bytes of tensor data, its header describes {end})")
    return metadata, tensors


def weight_files(path: Path) -> dict:
    """{file: names of the tensors it should hold}, from the index of a sharded directory; {file: None} otherwise."""
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        if not (path / "model.safetensors").exists() and any(path.glob("model-*-of-*.safetensors")):
            raise BrokenFile(f"{index_file} is missing (the directory holds sharded weights)")
        return {path / "model.safetensors": None}
    weight_map = read_json(index_file, "a safetensors index").get("weight_map")
    valid = isinstance(weight_map, dict) and all(
        isinstance(name, str) and isinstance(file, str) and re.fullmatch(r"[\w.-]+\.safetensors", file)
        for name, file in weight_map.items()
    )
    if not valid or not weight_map:
        raise BrokenFile(f"{index_file} has no valid weight_map (tensor name -> file name in the directory)")
    files = {}
    for name, file in weight_map.items():
        files.setdefault(path / file, set()).add(name)
    missing = [file for file in files if not file.is_file()]
    if missing:
        raise BrokenFile(f"{index_file} names {missing[0].name}, which is missing")
    return files


def weight_headers(path: Path, config: dict) -> tuple[dict, dict]:
    """(weight_files(path), {name: (dtype, shape)} of every tensor), the headers checked against the index, each
    other and config.json's dtype and quantization."""
    files, headers = weight_files(path), {}
    for file, names in files.items():
        _, tensors = safetensors_header(file)
        if names is not None and set(tensors) != names:
            name = sorted(names ^ set(tensors))[0]
            where = "does not hold" if name in names else "holds"
            raise BrokenFile(f"{file} {where} {name}, against model.safetensors.index.json")
        repeated = sorted(set(tensors) & set(headers))
        if repeated:
            raise BrokenFile(f"{file} holds {repeated[0]} again")
        headers.update(tensors)

    mlx = config["mlx"]
    quantization = mlx["quantization"]
    check_quantization(path, headers, quantization)
    for name, (dtype, shape) in headers.items():
        expected = DTYPE_NAMES[mlx["dtype"]]
        if mlx.get("linear_dtype") and is_linear_weight(name, shape):
            expected = DTYPE_NAMES[mlx["linear_dtype"]]
        # A quantized linear layer's scales and biases: in the quantization's scales_dtype (convert.scales_dtype).
        quantized = name.removesuffix(".scales").removesuffix(".biases")
        if quantization and quantized != name and is_linear_weight(quantized + ".weight", shape):
            expected = DTYPE_NAMES[quantization.get("scales_dtype", mlx["dtype"])]
        if mlx.get("embedding_dtype") and name == "shared.weight":
            expected = DTYPE_NAMES[mlx["embedding_dtype"]]
        if f"{name.removesuffix('.weight')}.scales" in headers:
            expected = "U32"
        elif name.endswith(".mlp.wo.weight") and "wo" in (mlx.get("fp32_modules") or []):
            expected = "F32"
        if dtype != expected:
            raise BrokenFile(f"{path}: {name} is {dtype}, but config.json says {expected} (mlx.dtype {mlx['dtype']})")
    return files, headers


def check_sizes(config: dict, shapes: dict):
    """config.json's sizes against the weights' shapes ({name: shape}, from the files' headers), before a model of
    those sizes is built: the layers of each stack from the tensor names, and vocab_size, d_model, the attention's
    width, d_ff and the buckets from the shapes of the tensors that have them (the rows alone where quantized)."""
    args = ModelArgs.from_dict(config)
    for stack, count in (("encoder", args.num_layers), ("decoder", args.num_decoder_layers)):
        layers = {int(match[1]) for name in shapes if (match := re.match(rf"{stack}\.layers\.(\d+)\.", name))}
        if max(layers, default=-1) >= count:
            prefix = f"{stack}.layers."
            unexpected = sorted(name for name in shapes if name.startswith(prefix) and int(name.split(".")[2]) >= count)
            raise BrokenFile(f"config.json gives the {stack} {count} layers: unexpected {unexpected[:3]}")
        if len(layers) < count:
            raise BrokenFile(f"config.json gives the {stack} {count} layers, the weights hold {len(layers)}")
    inner = args.num_heads * args.d_kv
    feed_forward = "wi_0" if args.is_gated else "wi"
    expected = {
        "shared.weight": (args.vocab_size, args.d_model),
        "encoder.final_norm.weight": (args.d_model,),
        "encoder.layers.0.self_attn.q.weight": (inner, args.d_model),
        f"encoder.layers.0.mlp.{feed_forward}.weight": (args.d_ff, args.d_model),
        "encoder.relative_attention_bias.weight": (args.relative_attention_num_buckets, args.num_heads),
    }
    for name, shape in expected.items():
        if name not in shapes:
            continue
        quantized = f"{name.removesuffix('.weight')}.scales" in shapes
        if quantized and shapes[name][0] != shape[0]:
            raise BrokenFile(f"{name} has shape {shapes[name]}, config.json implies {shape[0]} rows")
        if not quantized and shapes[name] != shape:
            raise BrokenFile(f"{name} has shape {shapes[name]}, config.json implies {shape}")


def check_quantization(path: Path, headers: dict, quantization: Optional[dict]):
    """The packed weights, their scales and config.json's mlx.quantization must tell the same story."""
    scales = [name for name in headers if name.endswith(".scales")]
    if not quantization:
        if scales:
            raise BrokenFile(f"{path} holds quantized weights ({scales[0]}); config.json says mlx.quantization null")
        return
    if not scales:
        raise BrokenFile(f"{path}/config.json says the weights are quantized, but none is")
    bits, group_size = quantization["bits"], quantization["group_size"]
    for name in scales:
        weight = name.removesuffix(".scales") + ".weight"
        if weight not in headers or name.removesuffix(".scales") + ".biases" not in headers:
            raise BrokenFile(f"{path} holds {name} without its weight and biases")
        (_, (rows, words)), (_, (scale_rows, groups)) = headers[weight], headers[name]
        if (rows, words * 32 // bits) != (scale_rows, groups * group_size):
            raise BrokenFile(
                f"{path}: {weight} is not packed as config.json's mlx.quantization says "
                f"({bits} bits, groups of {group_size})"
            )


def check_tokenizer_files(path: Path):
    """The tokenizer files in `path` must be readable, and hold a vocabulary unless the tokenizer is byte-level."""
    for name in TOKENIZER_FILES:
        if name.endswith(".json") and (path / name).exists():
            read_json(path / name)
    if (path / "spiece.model").exists():
        import sentencepiece

        try:
            sentencepiece.SentencePieceProcessor(model_file=str(path / "spiece.model"))
        except Exception as e:  # sentencepiece raises RuntimeError or OSError for a damaged model
            raise BrokenFile(f"{path / 'spiece.model'} is not a SentencePiece model ({e})") from None
    tokenizer_config = path / "tokenizer_config.json"
    byte_level = tokenizer_config.exists() and read_json(tokenizer_config).get("tokenizer_class") == "ByT5Tokenizer"
    if not byte_level and not any((path / name).exists() for name in VOCABULARY_FILES):
        raise BrokenFile(f"{path} has no tokenizer ({' or '.join(VOCABULARY_FILES)})")


def transformers_checkpoint(path: Path) -> Optional[str]:
    """What `path` is, if it is a transformers checkpoint rather than a conversion (None otherwise)."""
    config = recorded_config(path)
    if mlx_weights(path):
        return None
    if config and "mlx" not in config and ("model_type" in config or "architectures" in config):
        model_type = config.get("model_type")
        return f"a transformers {model_type} checkpoint" if model_type else "a transformers checkpoint"
    if not config and any(path.glob("pytorch_model*.bin*")):
        return "a transformers checkpoint (pytorch_model.bin) without config.json"
    return None


def is_conversion(path: Path) -> bool:
    """Whether `path` is empty or holds only files convert.py writes, which its --force may replace."""
    entries = list(path.iterdir())
    if not all(entry.is_file() and OUTPUT_FILES.fullmatch(entry.name) for entry in entries):
        return False
    # convert.py records its source in config.json and marks its safetensors files.
    return "source" in recorded_config(path).get("mlx", {}) or mlx_weights(path) or not entries


def mlx_weights(path: Path) -> bool:
    """Whether a safetensors file in `path` is marked as convert.py marks its own (transformers marks its "pt")."""
    for file in path.glob("*.safetensors"):
        try:
            if safetensors_header(file)[0].get("format") == "mlx":
                return True
        except BrokenFile:
            pass
    return False


def recorded_config(path: Path) -> dict:
    """config.json as far as it can be read, with its "mlx" entry a dict; {} when it cannot be read at all."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(config, dict):
        return {}
    if "mlx" in config and not isinstance(config["mlx"], dict):
        return {**config, "mlx": {}}
    return config


def recorded_source(path: Path) -> str:
    """The checkpoint `path` was converted from, as config.json records it, when it can tell."""
    source = recorded_config(path).get("mlx", {}).get("source")
    if not isinstance(source, str) or not source:
        return "<checkpoint>"
    # A local directory that has since gone is no use in a command.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    return source if Path(source).is_dir() or not looks_local else "<checkpoint>"


def fresh_path(path: Path) -> Path:
    """A path beside `path` that does not exist yet."""
    candidates = (path.with_name(f"{path.name}-mlx{f'-{i}' if i else ''}") for i in range(100))
    return next(candidate for candidate in candidates if not candidate.exists())


def convert_command(checkpoint: Path) -> str:
    return f"python convert.py --model {checkpoint} --mlx-path {fresh_path(checkpoint)}"


def reconvert_command(path: Path) -> str:
    """A convert.py command that rebuilds `path`, replacing it only if convert.py wrote everything in it."""
    command = f"python convert.py --model {recorded_source(path)}"
    if is_conversion(path):
        return f"{command} --mlx-path {path} --force"
    return f"{command} --mlx-path {fresh_path(path)} (a new directory: {path} holds files convert.py did not write)"
