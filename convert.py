"""Convert a Hugging Face T5 checkpoint to an MLX model directory (config, tokenizer files, safetensors).

Tensors stream one at a time from memory-mapped source files into output shards whose layout is planned up
front, so memory stays near the size of the largest tensor rather than that of the model.
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import json
import os
import re
import resource
import shutil
import socket
import struct
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from safetensors import safe_open
from tqdm import tqdm

from checks import TOKENIZER_FILES, is_linear_weight
from model import ACTIVATIONS, T5, ModelArgs

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
ARCHITECTURES = {"T5ForConditionalGeneration", "MT5ForConditionalGeneration"}
# (single file, index of a sharded checkpoint), in order of preference.
WEIGHT_LAYOUTS = [
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
]
HF_LAYOUT = "a local directory in HF layout (config.json, weights, tokenizer files)"

DROPPED_KEYS = {
    # Tied duplicates of shared.weight.
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    # Present in the original checkpoints; transformers never uses it.
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}
# HF name (without ".weight") -> MLX name; every T5 tensor is a ".weight".
KEY_PATTERNS = {
    r"(shared|lm_head)": r"\1",
    r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.(relative_attention_bias)": r"\1.\2",
    r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])": r"\1.layers.\2.self_attn.\3",
    r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm": r"\1.layers.\2.self_attn_norm",
    r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)": r"encoder.layers.\1.mlp.\2",
    r"encoder\.block\.(\d+)\.layer\.1\.layer_norm": r"encoder.layers.\1.mlp_norm",
    r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])": r"decoder.layers.\1.cross_attn.\2",
    r"decoder\.block\.(\d+)\.layer\.1\.layer_norm": r"decoder.layers.\1.cross_attn_norm",
    r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)": r"decoder.layers.\1.mlp.\2",
    r"decoder\.block\.(\d+)\.layer\.2\.layer_norm": r"decoder.layers.\1.mlp_norm",
    r"(encoder|decoder)\.final_layer_norm": r"\1.final_norm",
}


class ConversionError(Exception):
    """A problem with the user's input; the message says what to do next."""


def hf_to_mlx_key(name: str) -> str | None:
    """The MLX parameter name of a transformers T5 tensor name, or None for tensors that are dropped."""
    if name in DROPPED_KEYS:
        return None
    for pattern, replacement in KEY_PATTERNS.items():
        match = re.fullmatch(pattern + r"\.weight", name)
        if match:
            return match.expand(replacement) + ".weight"
    raise ConversionError(f"unknown tensor {name!r}; only T5ForConditionalGeneration checkpoints convert")


def default_mlx_path(model: str) -> Path:
    name = Path(model).resolve().name if Path(model).is_dir() else model.replace("/", "-")
    return Path("mlx_models") / name


def download(repo_id: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "spiece.model", "*.safetensors"]
    try:
        files = HfApi().list_repo_files(repo_id)
    except HFValidationError:
        raise ConversionError(f"{repo_id!r} is neither a directory nor a hub id; pass {HF_LAYOUT}") from None
    except RepositoryNotFoundError:
        raise ConversionError(f"the hub has no repo {repo_id!r}; if it is private, `hf auth login`") from None
    except Exception as e:  # offline mode and network failures come as several unrelated exception types
        try:  # an earlier download in the local cache still works
            cached = snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"], local_files_only=True)
            return Path(cached)
        except LocalEntryNotFoundError:
            raise ConversionError(
                f"{repo_id!r} is not a local directory and the Hugging Face hub could not be reached ({e}); "
                f"connect to the network or pass {HF_LAYOUT}"
            ) from None
    if not any(file.endswith(".safetensors") for file in files):
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ConversionError(f"downloading {repo_id!r} failed ({e}); check the network, run again") from None


def read_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} has no config.json; pass {HF_LAYOUT}")
    try:
        config = json.loads(path.read_text())
        model_type, architectures = config.get("model_type"), config.get("architectures")
    except (ValueError, AttributeError) as e:
        raise ConversionError(f"{path} is not a JSON object ({e}); download the checkpoint again") from None
    supported_architecture = architectures is None or ARCHITECTURES & set(architectures)
    if model_type not in ("t5", "mt5") or not supported_architecture:
        raise ConversionError(
            f"{path} says model_type={model_type!r}, architectures={architectures}: not a T5/mT5 "
            "ForConditionalGeneration model; pick such a checkpoint"
        )
    try:
        ModelArgs.from_dict(config)
    except (TypeError, ValueError, AttributeError) as e:
        acts = ", ".join(sorted(ACTIVATIONS))
        raise ConversionError(f"{path}: {e}; use ACT or gated-ACT with ACT in {acts}") from None
    return config


def weight_files(source: Path) -> list[Path]:
    for single, index in WEIGHT_LAYOUTS:
        if (source / single).is_file():
            return [source / single]
        if (source / index).is_file():
            try:
                names = sorted(set(json.loads((source / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{source / index} is invalid ({e}); download it again") from None
            missing = [name for name in names if not (source / name).is_file()]
            if missing:
                raise ConversionError(f"{source / index} names {missing[0]}, which is missing; download it")
            return [source / name for name in names]
    raise ConversionError(
        f"no weights in {source}: expected model.safetensors, pytorch_model.bin or a sharded index of "
        "either; download the complete checkpoint"
    )


def open_weights(files: list[Path]) -> dict:
    """Memory-map the weight files -> {HF name: (shape, function loading that one torch tensor, its dtype: "BF16" for
    bfloat16)}."""
    tensors = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                handle = safe_open(str(path), framework="pt")
                for name in handle.keys():
                    tensor_slice = handle.get_slice(name)
                    shape, dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                    tensors[name] = (shape, lambda handle=handle, name=name: handle.get_tensor(name), dtype)
            else:
                import torch  # here, not at the top: it takes a second, and failing early should be quick

                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    dtype = "BF16" if tensor.dtype == torch.bfloat16 else str(tensor.dtype)
                    tensors[name] = (tuple(tensor.shape), lambda tensor=tensor: tensor, dtype)
        except Exception as e:  # safetensors and torch report damaged files with many exception types
            raise ConversionError(f"{path} is truncated or corrupt ({e}); download it again") from None
    return tensors


def output_config(source_config: dict, has_lm_head: bool, mlx: dict) -> dict:
    config = {**source_config, "tie_word_embeddings": not has_lm_head, "mlx": mlx}
    # transformers 5 scales the decoder output exactly when the source config does not untie embeddings.
    untied = source_config.get("tie_word_embeddings", True) is False
    config["scale_decoder_outputs"] = source_config.get("scale_decoder_outputs", not untied)
    return config


def check_shapes(config: dict, shapes: dict):
    """Compare {MLX name: shape} with the parameters of the model `config` describes (allocating nothing)."""
    from checks import BrokenFile, check_sizes  # here: checks.py imports this module

    try:  # the sizes first, before a model of those sizes is built
        check_sizes(config, shapes)
    except BrokenFile as e:
        raise ConversionError(f"the weights do not match config.json: {e}; use the checkpoint's own") from None
    model = T5(ModelArgs.from_dict(config))
    expected = {name: param.shape for name, param in tree_flatten(model.parameters())}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConversionError(f"the weights do not match config.json ({detail}); use the checkpoint's own")
    for name, shape in shapes.items():
        if shape != tuple(expected[name]):
            raise ConversionError(
                f"{name} has shape {shape} but config.json implies {tuple(expected[name])}; "
                "use the checkpoint's own config"
            )


@dataclass
class TensorPlan:
    source: str  # HF tensor name
    dtype: mx.Dtype  # before quantizing
    quantize: bool
    outputs: list  # [(MLX name, dtype, shape)] in the order they are written

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.size for _, dtype, shape in self.outputs)


def scales_dtype(dtype: str, q_bits: int, q_scales_dtype: str) -> str:
    """The dtype of a quantized linear layer's scales and biases: the model's own, but for a float32 model's 4-bit
    weights (q_scales_dtype "auto"), bfloat16: 10% fewer bytes a weight with groups of 64, and on the demo pair a KL
    against the float32 model of 7.09e-4, against 7.13e-4 with float32 ones. 8-bit weights keep float32 ones: bfloat16
    ones took their KL from 6.50e-6 to 1.36e-5, for 6% fewer bytes."""
    if q_scales_dtype not in ("auto", "float32", "bfloat16"):
        raise ConversionError(f"q_scales_dtype must be auto, float32 or bfloat16, got {q_scales_dtype!r}")
    if dtype != "float32":
        if q_scales_dtype not in ("auto", dtype):
            raise ConversionError(f"--q-scales-dtype {q_scales_dtype} needs --dtype float32 (the scales are {dtype})")
        return dtype
    if q_scales_dtype == "auto":
        return "bfloat16" if q_bits == 4 else "float32"
    return q_scales_dtype


def plan_tensor(
    key: str, source: str, shape: tuple, dtype: mx.Dtype, quantization, scales: mx.Dtype | None = None
) -> TensorPlan:
    # Mirrors transformers' _keep_in_fp32_modules = ["wo"]: T5's wo overflows in float16.
    if dtype == mx.float16 and key.endswith(".mlp.wo.weight"):
        return TensorPlan(source, mx.float32, False, [(key, mx.float32, shape)])
    # Quantize every 2-D weight (linear layers, shared/lm_head embeddings) but the relative attention bias.
    if (
        quantization is None
        or len(shape) != 2
        or key.endswith("relative_attention_bias.weight")
        or shape[1] % quantization["group_size"]
    ):
        return TensorPlan(source, dtype, False, [(key, dtype, shape)])
    rows, columns = shape
    packed = (rows, columns * quantization["bits"] // 32)  # uint32 words
    groups = (rows, columns // quantization["group_size"])
    prefix = key.removesuffix("weight")
    outputs = [
        (key, mx.uint32, packed),
        (prefix + "scales", scales or dtype, groups),
        (prefix + "biases", scales or dtype, groups),
    ]
    return TensorPlan(source, dtype, True, outputs)


def split_shards(plans: list[TensorPlan], max_shard_size: int) -> list[list[TensorPlan]]:
    # A quantized weight shares its shard with its scales and biases; an oversized tensor gets a shard alone.
    shards, size = [[]], 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def convert_tensor(tensor, plan: TensorPlan, quantization: dict | None) -> list[mx.array]:
    # tensor: a torch.Tensor of any float dtype (numpy has no bfloat16, hence float32 on the way)
    weight = mx.array(tensor.float().numpy()).astype(plan.dtype)
    if plan.quantize:
        # Quantized in the model's dtype; the scales and biases then rounded to theirs where it differs.
        words, scales, biases = mx.quantize(weight, quantization["group_size"], quantization["bits"])
        held = plan.outputs[1][1]
        return [words, scales.astype(held), biases.astype(held)]
    return [weight]


def write_shard(path: Path, plans: list[TensorPlan], tensors: dict, quantization: dict | None):
    """Write a safetensors file: the header from `plans`, then each tensor as it is converted.

    A generator: it yields after each tensor, so the caller can track progress and memory.
    """
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name, dtype, shape in (output for plan in plans for output in plan.outputs):
        end = offset + int(np.prod(shape)) * dtype.size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, end]}
        offset = end
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for plan in plans:
            arrays = convert_tensor(tensors[plan.source][1](), plan, quantization)
            for (name, dtype, shape), array in zip(plan.outputs, arrays, strict=True):
                assert (array.dtype, tuple(array.shape)) == (dtype, shape), f"{name} does not match its plan"
                # numpy has no bfloat16: write its bits.
                f.write(np.asarray(array.view(mx.uint16) if dtype == mx.bfloat16 else array).data)
            del arrays  # freed before the next tensor is converted
            yield


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes; 0 where there is no /proc (macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except OSError:
        return 0


class PeakMemory:
    """Peak anonymous memory (RssAnon; mapped files do not count), sampled every 20 ms and by `sample()`."""

    def __init__(self):
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self):
        self.peak = max(self.peak, rss_anon())

    def run(self):
        while not self.stopped.wait(0.02):
            self.sample()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        self.sample()

    def __str__(self):
        if self.peak:
            return f"peak RssAnon {self.peak / 2**20:.0f} MiB"
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return f"peak RSS {maxrss / 2**20:.0f} MiB (maxrss, mapped files included)"


# Each staging directory convert.py makes holds this file, naming the process that owns it (host, id, start time), so
# that a later run can remove what a killed run left behind, and nothing else.
OWNER_FILE = ".convert-owner"


def process_start(pid: int):
    """When process `pid` started (clock ticks after boot, from /proc); None where that cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def mark_as_owned(directory: Path):
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}
    (directory / OWNER_FILE).write_text(json.dumps(owner))


def owner_is_gone(owner) -> bool:
    """Whether the convert.py process an owner file names has ended; False whenever that cannot be told."""
    if not isinstance(owner, dict):
        return False
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return False  # another machine's (a shared disk), or not written by convert.py
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    # A process with that id is alive: the owner, unless the id went to a process started since.
    started = owner.get("started")
    return started is not None and process_start(pid) not in (None, started)


def remove_stale_staging(parent: Path):
    """Remove the staging directories in `parent` of convert.py runs that ended without removing them (killed, or
    their machine lost power): only directories marked as convert.py's whose process is gone."""
    for entry in sorted([*parent.glob(".*.tmp-*"), *parent.glob(".*.old-*")]):
        owner_file = entry / OWNER_FILE
        if entry.is_symlink() or not entry.is_dir() or owner_file.is_symlink() or not owner_file.is_file():
            continue
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if owner_is_gone(owner):
            print(f"removing {entry}, left by a convert.py run that was stopped", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staging_dir(out: Path, force: bool):
    """Yield an empty directory beside `out`; on success it is renamed to `out` (replacing it if `force`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    # A fresh name every run, so a directory left by a killed run never collides.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        mark_as_owned(staging)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    holder = None
    if force and out.exists():
        holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        mark_as_owned(holder)
        out.rename(holder / out.name)
    (staging / OWNER_FILE).unlink()
    staging.rename(out)
    if holder is not None:
        shutil.rmtree(holder)


def convert(
    model: str,
    mlx_path: str | None = None,
    dtype: str = "float32",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
    max_shard_size: int = 2 << 30,
    keep_bfloat16: bool = True,
    q_scales_dtype: str = "auto",
) -> Path:
    """Convert the T5 checkpoint `model` (hub id or local HF directory) to an MLX directory; return its path.

    With dtype float32 and keep_bfloat16, the linear layers' matrices of a checkpoint that stores them all in bfloat16
    stay bfloat16 (`mlx.linear_dtype`), and so do its token embeddings where they are bfloat16 (`mlx.embedding_dtype`):
    float32 holds each of them exactly, so the model computes the same numbers in float32 while its products read half
    the bytes. Quantized, the linear layers' scales and biases are of scales_dtype(dtype, q_bits, q_scales_dtype).
    Everything is checked before anything is written, and the output
    appears complete or not at all.
    """
    out = Path(mlx_path) if mlx_path else default_mlx_path(model)
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it, or another --mlx-path")
    quantization = None
    if quantize:
        held = scales_dtype(dtype, q_bits, q_scales_dtype)
        quantization = {"group_size": q_group_size, "bits": q_bits, "scales_dtype": held}
    mlx = {"dtype": dtype, "quantization": quantization, "fp32_modules": ["wo"] if dtype == "float16" else []}

    with PeakMemory() as memory:
        source = Path(model) if Path(model).is_dir() else download(model)
        source_config = read_config(source)
        tensors = open_weights(weight_files(source))
        config = output_config(source_config, "lm_head.weight" in tensors, {**mlx, "source": model})
        keys = {name: hf_to_mlx_key(name) for name in tensors}
        keys = {name: key for name, key in keys.items() if key}
        shapes = {key: tensors[name][0] for name, key in keys.items()}
        check_shapes(config, shapes)
        linear = {name for name, key in keys.items() if is_linear_weight(key, shapes[key])}
        keep = keep_bfloat16 and dtype == "float32" and not quantize and linear
        keep = keep and all(tensors[name][2] == "BF16" for name in linear)
        if keep:
            config["mlx"]["linear_dtype"] = "bfloat16"
            # The token embeddings too (a tied head's weights): the model widens the rows it looks up.
            embedding = [name for name, key in keys.items() if key == "shared.weight"]
            if embedding and tensors[embedding[0]][2] == "BF16":
                config["mlx"]["embedding_dtype"] = "bfloat16"
                linear.update(embedding)
        target = DTYPES[dtype]
        # A quantized linear layer's scales and biases (an embedding's are the model's dtype: a row looked up is
        # dequantized in its scales' dtype).
        scales = DTYPES[quantization["scales_dtype"]] if quantize else None
        plans = [
            plan_tensor(
                key,
                name,
                shapes[key],
                mx.bfloat16 if keep and name in linear else target,
                quantization,
                scales if name in linear else None,
            )
            for name, key in keys.items()
        ]
        shards = split_shards(plans, max_shard_size)
        files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        if len(shards) == 1:
            files = ["model.safetensors"]

        with staging_dir(out, force) as staging:
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, staging / name)
            with tqdm(total=len(plans), unit="tensor", desc="Converting") as progress:
                for file, shard in zip(files, shards):
                    for _ in write_shard(staging / file, shard, tensors, quantization):
                        memory.sample()
                        progress.update()
            if len(shards) > 1:
                weight_map = {name: file for file, shard in zip(files, shards) for p in shard for name, *_ in p.outputs}
                index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
                (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    print(f"Saved {out} ({memory})")
    return out


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as for every other error of this tool.
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Convert a Hugging Face T5 checkpoint to MLX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hub id (e.g. t5-small) or local HF directory.")
    parser.add_argument("--mlx-path", help="Output directory; None means mlx_models/<model, '/' -> '-'>.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Data type of the weights.")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize linear/embedding weights.")
    parser.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="Bits per quantized weight.")
    parser.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64, help="Group size.")
    parser.add_argument(
        "--keep-bfloat16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="With --dtype float32, keep the linear layers (and token embeddings) of a bfloat16 checkpoint in "
        "bfloat16: the same numbers (float32 holds them exactly) at half the bytes, computed in float32.",
    )
    parser.add_argument(
        "--q-scales-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="With -q and --dtype float32, the dtype of the linear layers' scales and biases; auto: bfloat16 for "
        "4-bit weights (10%% fewer bytes, no more KL against float32 on the demo pair), float32 for 8-bit (bfloat16 "
        "doubles their KL there).",
    )
    parser.add_argument("--force", action="store_true", help="Replace the output directory if it exists.")
    return parser


def main():
    args = setup_arg_parser().parse_args()
    try:
        convert(**vars(args))
    except ConversionError as e:
        # One line, even where a library's message spans several.
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written, run again to convert", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
