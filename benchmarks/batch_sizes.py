"""Throughput of batched decoding: tokens/s against batch size, regular and speculative, in one run.

The same prompts are decoded one at a time (`generate`, the single-sequence path) and `batch_size` at a time
(`generate_batch`), greedy with a fixed number of tokens per prompt; every method must produce the same tokens.
Methods alternate round by round, so a slow spell of the shared machine falls on all of them alike.
benchmarks/end_to_end.py uses this for its batched rows and experiments/run.py for its batch-size axis; run alone it
measures the demo pair:

    python -m benchmarks.batch_sizes --batch-sizes 1 2 4 8 16 --out benchmark_out

Several draft lengths side by side (`auto` among them), each prompt decoded to its EOS as a user's would be:

    python -m benchmarks.batch_sizes --pairs demo --batch-sizes 8 --prompts 48 --eos --num-draft 4 6 8 auto
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from decoder import SpeculativeDecoder, Stats

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
BATCH_SIZES = [1, 2, 4, 8, 16]
PAUSE = 0.5  # seconds between timed runs: the BLAS threads of the run before stop spinning


def batch_methods(decoder, prompts, max_tokens, batch_sizes, kinds=("regular", "speculative"), ignore_eos=True):
    """name -> fn() returning (seconds, tokens of every prompt): each kind one at a time and at each batch size."""

    def one_at_a_time(regular):
        def run():
            start = time.perf_counter()
            tokens = [
                decoder.generate(prompt, max_tokens=max_tokens, regular=regular, ignore_eos=ignore_eos).tokens
                for prompt in prompts
            ]
            return time.perf_counter() - start, tokens

        return run

    def batched(regular, batch_size):
        def run():
            stats = Stats()
            generations = decoder.generate_batch(
                prompts,
                max_tokens=max_tokens,
                regular=regular,
                ignore_eos=ignore_eos,
                batch_size=batch_size,
                stats=stats,
            )
            return stats.seconds, [generation.tokens for generation in generations]

        return run

    methods = {}
    for kind in kinds:
        regular = kind == "regular"
        methods[(kind, 0)] = one_at_a_time(regular)
        for batch_size in batch_sizes:
            methods[(kind, batch_size)] = batched(regular, batch_size)
    return methods


def rounds(methods, repeats, warm_up):
    """Every method once on the `warm_up` run (compiling its shapes), then `repeats` rounds of all in turn.
    Returns name -> (median seconds, tokens of the last run)."""
    for fn in warm_up.values():
        fn()
    times = {name: [] for name in methods}
    tokens = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            time.sleep(PAUSE)
            seconds, tokens[name] = fn()
            times[name].append(seconds)
    return {name: (statistics.median(t), tokens[name]) for name, t in times.items()}


def speculative_name(num_draft, num_drafts) -> str:
    """A speculative method's name: "speculative", or with its draft length where several are measured."""
    return (
        "speculative" if len(num_drafts) == 1 else f"speculative {'auto' if num_draft == 'auto' else f'k={num_draft}'}"
    )


def measure(
    model,
    draft_model,
    tokenizer,
    prompts,
    num_draft,
    max_tokens,
    batch_sizes,
    repeats,
    pair="pair",
    ignore_eos=True,
):
    """Rows of (pair, method, batch_size (0: one at a time), tokens/s, speedups, same tokens), measured in one run.
    `num_draft`: a draft length ("auto" included), or a list of them, each a speculative method of its own."""
    num_drafts = list(num_draft) if isinstance(num_draft, (list, tuple)) else [num_draft]
    # method name -> (its decoder, its draft length)
    decoders = {"regular": (SpeculativeDecoder(model, None, tokenizer), 0)}
    for length in num_drafts if draft_model is not None else []:
        decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=length)
        decoders[speculative_name(length, num_drafts)] = (decoder, length)

    def methods_of(some_prompts, tokens):
        methods = {}
        for name, (decoder, _) in decoders.items():
            kinds = ("regular",) if name == "regular" else ("speculative",)
            for (_, size), fn in batch_methods(decoder, some_prompts, tokens, batch_sizes, kinds, ignore_eos).items():
                methods[(name, size)] = fn
        return methods

    methods, warm_up = methods_of(prompts, max_tokens), methods_of(prompts[:2], 4)
    runs = rounds(methods, repeats, warm_up)
    reference = runs[("regular", 0)][1]
    generated = sum(len(tokens) for tokens in reference)
    rows = []
    for (kind, batch_size), (seconds, tokens) in runs.items():
        speed = generated / seconds
        rows.append(
            dict(
                pair=pair,
                method=kind,
                batch_size=batch_size,
                prompts=len(prompts),
                tokens_per_prompt=max_tokens if ignore_eos else round(generated / len(prompts), 2),
                num_draft=decoders[kind][1],
                median_seconds=round(seconds, 4),
                tokens_per_second=round(speed, 2),
                vs_one_at_a_time=round(runs[(kind, 0)][0] / seconds, 3),
                vs_regular_same_batch=round(runs[("regular", batch_size)][0] / seconds, 3),
                same_tokens=tokens == reference,
            )
        )
    return rows


def against_transformers(model, draft_model, tokenizer, prompts, pair, max_tokens, batch_size, repeats, transformers):
    """benchmarks/end_to_end.py's batched rows: this project's regular and speculative decoding `batch_size` prompts at
    a time against transformers' batched generate() (`transformers`: fn() -> (seconds, tokens of every prompt)) on the
    same prompts; transformers' assisted generation has no batched row, as it raises for a batch of more than one."""
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=pair.num_draft)
    methods = {
        f"mlx {kind}": fn
        for (kind, size), fn in batch_methods(decoder, prompts, max_tokens, [batch_size]).items()
        if size
    }
    methods["transformers generate"] = transformers
    warm_up = dict(batch_methods(decoder, prompts[:2], 4, [batch_size]))
    runs = rounds(methods, repeats, warm_up)
    reference = runs["transformers generate"][1]
    generated = sum(len(tokens) for tokens in reference)
    rows = [
        dict(
            pair=pair.name,
            method=f"{name}, batch {batch_size}",
            num_draft=pair.num_draft if "speculative" in name else 0,
            tokens=generated,
            median_seconds=round(seconds, 4),
            spread_seconds=None,
            tokens_per_second=round(generated / seconds, 2),
            same_tokens_as_transformers=tokens == reference,
        )
        for name, (seconds, tokens) in runs.items()
    ]
    cannot = dict(median_seconds=None, tokens_per_second=None, same_tokens_as_transformers="cannot batch")
    rows.append(dict(rows[-1], method=f"transformers assisted, batch {batch_size}", num_draft=pair.num_draft, **cannot))
    return rows


def transformers_generate(model, prompts, batch_size, options):
    """transformers generate() on `batch_size` prompts at a time, right-padded with an attention mask (assisted
    generation cannot batch: it supports batch size 1 only). Returns every prompt's tokens, in order."""
    import torch

    tokens = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk])
        tokens += model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=growing_cache(), **options)[
            :, 1:
        ].tolist()
    return tokens


def growing_cache():
    """A transformers cache that adds layers as they come: the one generate() makes holds as many decoder layers as
    the encoder has, which breaks a model whose decoder is deeper (the demo pair's main model)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def print_rows(rows):
    print(f"{'pair':<28}{'method':<20}{'batch':>7}{'tok/s':>9}{'vs alone':>10}{'vs regular':>12}  same tokens")
    for row in rows:
        batch = row["batch_size"] or "alone"
        print(
            f"{row['pair']:<28}{row['method']:<20}{batch:>7}{row['tokens_per_second']:>9.1f}"
            f"{row['vs_one_at_a_time']:>9.2f}x{row['vs_regular_same_batch']:>11.2f}x  {row['same_tokens']}"
        )


def write_rows(rows, out, name="batch_size"):
    """`name`.csv and `name`.json in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    return [out / f"{name}.csv", out / f"{name}.json"]


def plot(rows, path, description):
    """Tokens/s against batch size, regular and speculative, per pair; one at a time as a dashed level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pairs = list(dict.fromkeys(row["pair"] for row in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        kinds = list(dict.fromkeys(row["method"] for row in rows if row["pair"] == pair))
        for kind, color in zip(kinds, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]):
            points = [row for row in rows if row["pair"] == pair and row["method"] == kind]
            batched = sorted((row["batch_size"], row["tokens_per_second"]) for row in points if row["batch_size"])
            if batched:
                ax.plot(*zip(*batched), marker="o", color=color, label=f"{kind}, batched")
            for row in points:
                if row["batch_size"] == 0:
                    ax.axhline(row["tokens_per_second"], color=color, linestyle="--", label=f"{kind}, one at a time")
        ax.set_xscale("log", base=2)
        sizes = sorted({row["batch_size"] for row in rows if row["pair"] == pair and row["batch_size"]})
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.set(
            title=pair, xlabel="batch size (prompts decoded together)", ylabel="tokens/s (all prompts)", ylim=(0, None)
        )
        ax.legend()
    fig.suptitle(f"Throughput vs batch size (greedy)\n{description}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def demo_prompts(count):
    """`count` held-out prompts of the demo pair, cycling through them when more are asked for."""
    lines = [json.loads(line)["prompt"] for line in (DEMO / "prompts.txt").read_text().splitlines()]
    return [lines[i % len(lines)] for i in range(count)]


def pair_models(name, work):
    """(description, main model, draft model, tokenizer, num_draft) of a pair benchmarks/end_to_end.py also measures:
    the demo pair, or t5-base with a t5-small draft (random weights of those shapes, the demo tokenizer)."""
    import convert
    from loader import load_model
    from tools.random_checkpoint import reuse_or_write

    if name == "demo":
        sources, description, num_draft = [DEMO / "main", DEMO / "draft"], "demo pair", 1
    else:
        sources = [
            reuse_or_write("t5-base", work / "hf-base", seed=1),
            reuse_or_write("t5-small", work / "hf-small", seed=0),
        ]
        description, num_draft = "t5-base + t5-small draft (random)", 4
    models = [
        load_model(convert.convert(str(source), mlx_path=str(work / f"mlx-{i}")))[:2]
        for i, source in enumerate(sources)
    ]
    (model, tokenizer), (draft_model, _) = models
    return description, model, draft_model, tokenizer, num_draft


def main(argv=None):
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["demo", "base-small"], help="Pairs to measure: demo, base-small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=BATCH_SIZES, help="Batch sizes to measure")
    parser.add_argument("--prompts", type=int, default=16, help="Prompts decoded by every method")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per prompt (EOS ignored unless --eos)")
    parser.add_argument(
        "--eos", action="store_true", help="Decode each prompt to its EOS (at most --max-tokens), as a user's would be"
    )
    parser.add_argument(
        "--num-draft",
        nargs="+",
        default=None,
        help="Draft lengths to measure, each a speculative method of its own (a number, or auto; default: the pair's "
        "own length)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="Timed rounds of every method in turn")
    parser.add_argument("--out", type=Path, default=Path("benchmark_out"), help="Directory for the CSV, JSON, plot")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.prompts < 1 or args.max_tokens < 1 or args.repeats < 1:
        parser.exit(2, "error: --batch-sizes, --prompts, --max-tokens and --repeats must be at least 1\n")
    if not set(args.pairs) <= {"demo", "base-small"}:
        parser.exit(2, f"error: unknown pair in --pairs {' '.join(args.pairs)}; choose from demo, base-small\n")
    num_drafts = None
    if args.num_draft:
        if not all(value == "auto" or (value.isdigit() and int(value) >= 1) for value in args.num_draft):
            parser.exit(2, f"error: --num-draft takes numbers from 1 up or auto, got {' '.join(args.num_draft)}\n")
        num_drafts = [value if value == "auto" else int(value) for value in args.num_draft]
    rows = []
    for name in args.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            description, model, draft_model, tokenizer, num_draft = pair_models(name, Path(tmp))
        prompts = demo_prompts(args.prompts)
        rows += measure(
            model,
            draft_model,
            tokenizer,
            prompts,
            num_drafts or num_draft,
            args.max_tokens,
            args.batch_sizes,
            args.repeats,
            description,
            ignore_eos=not args.eos,
        )
        print_rows(rows)
    paths = write_rows(rows, args.out)
    tokens = f"to the EOS (at most {args.max_tokens} tokens)" if args.eos else f"{args.max_tokens} tokens each"
    paths.append(plot(rows, args.out / "batch_size.png", f"{args.prompts} prompts, {tokens}"))
    print("wrote " + ", ".join(str(path) for path in paths if path))


if __name__ == "__main__":
    main()
