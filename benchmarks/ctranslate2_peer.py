"""Regular greedy decoding against CTranslate2's, on the same random t5-base- and t5-large-shaped checkpoints: this
project's float32 against CTranslate2's float32, and its 8-bit (groups of 64, float activations unless T5_KERNELS
says otherwise) against CTranslate2's int8, in one run.

Each checkpoint is written once (tools/random_checkpoint.py, float32, seed 0) and converted by each project's own
converter. Every prompt is decoded by each method in turn, EOS ignored, in the orders of benchmarks.in_turn (each method
in every place, and after every other, equally often), so that a slow spell of the machine (they last seconds) falls on
all alike; each prompt's fastest round counts. The float32 runs must give CTranslate2's tokens (random weights decode
real greedy choices, so a difference is a bug; ids past the tokenizer's pieces are compared as CTranslate2 returns them,
as the unknown piece); the quantized ones are quantized differently (MLX's affine groups against CTranslate2's per-row
int8), so only their agreement is reported.

    python -m benchmarks.ctranslate2_peer                       # t5-base and t5-large, float32 and 8-bit
    python -m benchmarks.ctranslate2_peer --shapes t5-base --max-tokens 32
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import convert
import kernels
from benchmarks import in_turn
from benchmarks.decode_step import DEMO, CTranslate2Greedy
from decoder import SpeculativeDecoder
from loader import load_model
from prompt_file import read_prompts

# (name, this project's conversion options, CTranslate2's quantization)
DTYPES = [("float32", {}, "float32"), ("8-bit", dict(quantize=True, q_bits=8, q_group_size=64), "int8")]


def fastest_per_prompt(methods, prompts, rounds):
    """name -> (the sum over prompts of each prompt's fastest run in seconds, each prompt's tokens)."""
    names = list(methods)
    fastest = {name: [float("inf")] * len(prompts) for name in names}
    tokens = {name: [None] * len(prompts) for name in names}
    for round_ in range(rounds):
        for i, prompt in enumerate(prompts):
            for name in in_turn(names, i, round_):
                tick = time.perf_counter()
                tokens[name][i] = methods[name](prompt)
                fastest[name][i] = min(fastest[name][i], time.perf_counter() - tick)
    return {name: (sum(fastest[name]), tokens[name]) for name in names}


def as_pieces(tokens, tokenizer):
    """Token ids as CTranslate2 gives them back: it speaks in the tokenizer's pieces, so an id past them (a random
    model's vocabulary is a real model's, 32128, and the demo tokenizer has 1024 pieces) comes back as the unknown
    piece's."""
    return [token if token < len(tokenizer) else tokenizer.unk_token_id for token in tokens]


def measure_shape(shape, work, prompts, max_tokens, rounds):
    from tools.random_checkpoint import reuse_or_write

    checkpoint = reuse_or_write(shape, work / f"hf-{shape}", seed=0)
    rows = []
    for name, options, quantization in DTYPES:
        path = convert.convert(str(checkpoint), str(work / f"{shape}-{name}"), force=True, **options)
        model, tokenizer, _ = load_model(path)
        decoder = SpeculativeDecoder(model, None, tokenizer)
        peer = CTranslate2Greedy(checkpoint, work / f"{shape}-{name}", tokenizer, quantization, random_weights=True)
        methods = {
            "mlx regular": lambda p, d=decoder: d.generate(
                p, max_tokens=max_tokens, regular=True, ignore_eos=True
            ).tokens,
            "ctranslate2 greedy": lambda p, c=peer: c.generate(p, max_tokens),
        }
        for run in methods.values():  # warm-up
            run(prompts[0])
        runs = fastest_per_prompt(methods, prompts, rounds)
        peer.close()
        total = len(prompts) * max_tokens
        ours, theirs = (runs[name] for name in methods)
        agree = sum(as_pieces(a, tokenizer) == b for a, b in zip(ours[1], theirs[1])) / len(prompts)
        rows.append(
            dict(
                shape=shape,
                dtype=name,
                peer_compute_type=quantization,
                mlx_tok_s=round(total / ours[0], 2),
                ctranslate2_tok_s=round(total / theirs[0], 2),
                ratio=round(theirs[0] / ours[0], 3),
                same_tokens_share=agree,
                kernels=kernels.active,
            )
        )
    return rows


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=["t5-base", "t5-large"], choices=["t5-small", "t5-base", "t5-large"]
    )
    parser.add_argument("--prompts", type=int, default=4, help="Held-out demo prompts to decode (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens per prompt, EOS ignored (default: 32)")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds over the prompts (default: 3)")
    parser.add_argument(
        "--work", type=Path, help="Directory for the checkpoints, kept between runs (default: temporary)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark_out"), help="Directory for peer.json")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if min(args.prompts, args.max_tokens, args.rounds) < 1:
        print("error: --prompts, --max-tokens and --rounds must be at least 1", file=sys.stderr)
        sys.exit(2)
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("error: CTranslate2 is not installed; pip install -r requirements-experiments.txt", file=sys.stderr)
        sys.exit(2)
    prompts = read_prompts(DEMO / "prompts.txt")[: args.prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for shape in args.shapes:
            for row in measure_shape(shape, work, prompts, args.max_tokens, args.rounds):
                rows.append(row)
                print(
                    f"{row['shape']:9s} {row['dtype']:8s} mlx {row['mlx_tok_s']:7.2f} tok/s, CTranslate2 "
                    f"{row['peer_compute_type']} {row['ctranslate2_tok_s']:7.2f} tok/s: {row['ratio']:.2f}x; "
                    f"same tokens on {row['same_tokens_share']:.0%} of prompts",
                    flush=True,
                )
    print(f"kernels: {kernels.active}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.json").write_text(json.dumps(rows, indent=2))
    if any(row["dtype"] == "float32" and row["same_tokens_share"] < 1 for row in rows):
        print("error: float32 decoding differs from CTranslate2's", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
