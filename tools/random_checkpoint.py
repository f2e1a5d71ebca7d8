"""Write a transformers T5 checkpoint of a real model's shape with random weights, one tensor at a time.

    python -m tools.random_checkpoint --shape t5-11b --out /tmp/t5-11b-random      # 22 GB of bfloat16
    python convert.py --model /tmp/t5-11b-random --mlx-path /tmp/t5-11b-q4 -q --q-bits 4
    python main.py --model-name /tmp/t5-11b-q4 --regular-decode --prompt "..." -m 16 --json

For measuring speed and memory on shapes whose real weights are out of reach (the Hub is not needed): the weights are
normal with a standard deviation of fan_in^-1/2 (layer norms 1), written into safetensors shards of about 1 GB with
an index, so memory stays near one shard whatever the model's size. The tokenizer is the bundled demo pair's (its
vocabulary fits any T5's). The text such a model writes means nothing.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import T5Config, T5ForConditionalGeneration

from tools.shapes import SHAPES, VOCAB_SIZE

ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FROM = ROOT / "models" / "demo" / "main"
SHARD_BYTES = 1 << 30


def config_for(shape: str) -> T5Config:
    """The T5 v1.0 config (relu, tied embeddings) of a named shape, with T5's vocabulary size."""
    return T5Config(
        vocab_size=VOCAB_SIZE,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        **SHAPES[shape],
    )


def tensor_plan(config: T5Config, itemsize: int):
    """(name, shape, bytes) of every tensor a checkpoint stores (tied copies of the embedding left out), from a model
    built on the meta device, which allocates nothing."""
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    return [(name, tuple(t.shape), itemsize * t.numel()) for name, t in model.state_dict().items() if name not in tied]


def shards(plan):
    """The plan split into consecutive shards of about SHARD_BYTES."""
    groups, current, size = [], [], 0
    for entry in plan:
        if current and size + entry[2] > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[2]
    return groups + [current] if current else groups


def random_tensor(name: str, shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=dtype)
    std = 1.0 if name == "shared.weight" else shape[-1] ** -0.5
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(dtype)


def write(shape: str, out: Path, dtype_name: str, seed: int, tokenizer_dir: Path = TOKENIZER_FROM):
    config = config_for(shape)
    dtype = DTYPES[dtype_name]
    config.dtype = dtype_name
    plan = tensor_plan(config, torch.tensor([], dtype=dtype).element_size())
    groups = shards(plan)
    total = sum(nbytes for _, _, nbytes in plan)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"random {shape}") as bar:
        for index, group in enumerate(groups):
            file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for name, tensor_shape, nbytes in group:
                tensors[name] = random_tensor(name, tensor_shape, dtype, generator)
                weight_map[name] = file
                bar.update(nbytes)
            save_file(tensors, str(partial / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(partial)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, partial / file)
    partial.rename(out)
    print(f"wrote {out} ({total / 1e9:.1f} GB, {len(plan)} tensors in {len(groups)} shards)", file=sys.stderr)


def reuse_or_write(shape: str, out: Path, seed: int, tokenizer_dir: Path = TOKENIZER_FROM) -> Path:
    """`out` as a float32 checkpoint, written unless an earlier run made it (the same shape and seed make the same
    weights)."""
    if not (out / "config.json").exists():
        write(shape, out, "float32", seed, tokenizer_dir)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="t5-11b", help="Which T5's shape")
    parser.add_argument("--out", type=Path, required=True, help="Directory to create (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="Dtype of the stored weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; name a new directory with --out", file=sys.stderr)
        return 2
    write(args.shape, args.out, args.dtype, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
