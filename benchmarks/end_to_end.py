"""Speed of this project's decoding against transformers on the same weights, prompts and tokens, in one run.

For each model pair: regular decoding and speculative decoding here, transformers `generate()` and transformers
assisted generation (the same number of constant assistant tokens, confidence threshold 0) on torch CPU, all greedy
for a fixed number of tokens; the four must produce the same tokens. Also measured in the same run: the time of the
matrix products of one main-model decode step alone in MLX (the ceiling for this code) and the machine's memory
bandwidth (the physical ceiling: bytes of weights a decode step reads / bandwidth).
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS)

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import torch

import convert
import kernels
from benchmarks import batch_sizes, matmul
from decoder import SpeculativeDecoder, Stats
from loader import load_model
from tools.random_checkpoint import reuse_or_write

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
PAUSE = 0.5  # seconds between timed runs
# The batched rows: this many prompts (the demo pair's held-out ones), decoded this many at a time.
BATCH_PROMPTS = 16
BATCH_SIZE = 8
PROMPT = (
    "complete: def read_config(path):\n    with open(path) as f:\n        data = json.load(f)\n"
    "    if 'name' not in data:\n        raise ValueError('config has no name')\n    return"
)


@dataclass
class Pair:
    name: str
    main_dir: Path  # HF checkpoint
    draft_dir: Path
    num_draft: int
    # Both models in this dtype, here (converted to it) and in transformers (loaded in it).
    dtype: str = "float32"


class TransformersWorker:
    """transformers generate() and assisted generation, timed in a process of their own: an OpenBLAS loaded globally
    for MLX (blas.py) also serves torch's BLAS calls and makes torch ~5x slower, which would flatter this project.
    The process stays up, so that its runs can alternate with this process's runs."""

    def __init__(self, job):
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.end_to_end", "--transformers-worker", json.dumps(job)],
            cwd=ROOT,
            env={**os.environ, blas.ENV_VAR: "none"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
        )

    def run(self, method):
        """(seconds, tokens) of one timed run of `method`: "generate" or "assisted"."""
        self.process.stdin.write(method + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise RuntimeError(f"the transformers worker failed:\n{self.errors.read()}")
        result = json.loads(line)
        return result["seconds"], result["tokens"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.errors.close()


def transformers_worker(job):
    """Serve timed runs: read a method name per line on stdin, answer one JSON line (seconds, tokens) per run."""
    from transformers import AutoModelForSeq2SeqLM

    torch.set_num_threads(job["threads"])
    dtype = getattr(torch, job["dtype"])
    model = AutoModelForSeq2SeqLM.from_pretrained(job["main_dir"], dtype=dtype).eval()
    draft = AutoModelForSeq2SeqLM.from_pretrained(job["draft_dir"], dtype=dtype).eval()
    # A fixed number of tokens: no stopping at EOS (this project's runs use ignore_eos).
    options = dict(max_new_tokens=job["max_tokens"], do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    draft.generation_config.eos_token_id = None
    draft.generation_config.num_assistant_tokens = job["num_draft"]
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    input_ids = torch.tensor([job["input_ids"]])
    extra = {"generate": {}, "assisted": {"assistant_model": draft}}
    # The batched rows compare in float32, as this project runs the converted weights: a bfloat16 checkpoint (the demo
    # pair) computed in bfloat16 by transformers picks other tokens on some prompts.
    loaded = {}
    for method in sys.stdin:
        start = time.perf_counter()
        with torch.no_grad():
            if method.strip() == "generate batch":
                if "float32" not in loaded:
                    loaded["float32"] = AutoModelForSeq2SeqLM.from_pretrained(job["main_dir"], dtype=torch.float32)
                    loaded["float32"].generation_config.eos_token_id = None
                tokens = batch_sizes.transformers_generate(
                    loaded["float32"].eval(), job["batch_input_ids"], job["batch_size"], options
                )
            else:
                cache = batch_sizes.growing_cache()
                tokens = model.generate(input_ids=input_ids, past_key_values=cache, **options, **extra[method.strip()])
                tokens = tokens[0, 1:].tolist()
        print(json.dumps(dict(seconds=time.perf_counter() - start, tokens=tokens)), flush=True)


def timed_rounds(methods, repeats):
    """Run every method once to warm up, then `repeats` rounds of each method in turn, so that a slow spell of the
    machine falls on all of them alike. methods: name -> fn() returning (seconds, tokens).
    Returns name -> (median seconds, spread, tokens of the last run)."""
    times = {name: [] for name in methods}
    tokens = {name: fn()[1] for name, fn in methods.items()}
    for _ in range(repeats):
        for name, fn in methods.items():
            # Let the BLAS threads of the method before stop spinning: on 2 cores they would slow this one.
            time.sleep(PAUSE)
            seconds, tokens[name] = fn()
            times[name].append(seconds)
    return {name: (statistics.median(t), max(t) - min(t), tokens[name]) for name, t in times.items()}


def mlx_methods(model, draft, tokenizer, max_tokens, num_draft, other_num_drafts):
    """Regular decoding, speculative decoding at the pair's draft length (compared with assisted generation), at
    each of `other_num_drafts`, and with --num-draft auto."""

    def run(regular, num_draft=num_draft):
        decoder = SpeculativeDecoder(model, draft, tokenizer, num_draft=num_draft)

        def once():
            start = time.perf_counter()
            tokens = decoder.generate(PROMPT, max_tokens=max_tokens, regular=regular, ignore_eos=True).tokens
            return time.perf_counter() - start, tokens

        return once

    methods = {"mlx regular": run(True), "mlx speculative": run(False)}
    methods.update({f"mlx k={k}": run(False, k) for k in sorted(set(other_num_drafts) - {num_draft})})
    methods["mlx auto"] = run(False, "auto")
    return methods


def method_num_draft(name, pair_num_draft):
    """The draft length a method of the table ran with: 0 for regular decoding."""
    if name == "mlx auto":
        return "auto"
    if name.startswith("mlx k="):
        return int(name.removeprefix("mlx k="))
    return 0 if "regular" in name or "generate" in name else pair_num_draft


def decode_step_seconds(model, tokenizer, repeats=40):
    """Seconds per token of the main model's decode step as the decoder runs it: its own regular decoding loop
    (greedy, cache on, each step built and started before the host reads the token of the step before)."""
    warm_up = 6
    steps = SpeculativeDecoder(model, None, tokenizer).regular_tokens(
        mx.array([[3] * 64]), warm_up + repeats, True, Stats()
    )
    for _ in range(warm_up):
        next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / repeats


def memory_bandwidth(size=1 << 29, repeats=5):
    """Bytes per second read by a multi-threaded reduction over an array much larger than the caches."""
    data = torch.ones(size // 4, dtype=torch.float32)
    data.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    return size * repeats / (time.perf_counter() - start)


def benchmark_pair(pair, work, max_tokens, repeats, bandwidth, num_drafts):
    main_mlx = convert.convert(str(pair.main_dir), str(work / f"{pair.name}-main"), dtype=pair.dtype, force=True)
    draft_mlx = convert.convert(str(pair.draft_dir), str(work / f"{pair.name}-draft"), dtype=pair.dtype, force=True)
    model, tokenizer, _ = load_model(main_mlx)
    draft, _, _ = load_model(draft_mlx)
    job = dict(main_dir=str(pair.main_dir), draft_dir=str(pair.draft_dir), input_ids=tokenizer(PROMPT).input_ids)
    job.update(max_tokens=max_tokens, num_draft=pair.num_draft, threads=torch.get_num_threads(), dtype=pair.dtype)
    prompts = batch_sizes.demo_prompts(BATCH_PROMPTS)
    job.update(batch_input_ids=[tokenizer(prompt).input_ids for prompt in prompts], batch_size=BATCH_SIZE)
    worker = TransformersWorker(job)
    try:
        methods = mlx_methods(model, draft, tokenizer, max_tokens, pair.num_draft, num_drafts)
        methods["transformers generate"] = lambda: worker.run("generate")
        methods["transformers assisted"] = lambda: worker.run("assisted")
        runs = timed_rounds(methods, repeats)
        # The batched rows compare tokens with transformers in float32 (see transformers_worker).
        batch_rows = []
        if pair.dtype == "float32":
            batch_rows = batch_sizes.against_transformers(
                model,
                draft,
                tokenizer,
                prompts,
                pair,
                max_tokens,
                BATCH_SIZE,
                repeats,
                lambda: worker.run("generate batch"),
            )
    finally:
        worker.close()

    tokens = {name: result for name, (_, _, result) in runs.items()}
    # transformers generate() is every method's reference in float32. In a half type the two implementations round
    # differently and may pick other tokens: each must agree with itself (speculative decoding with regular decoding,
    # assisted generation with generate()).
    own = pair.dtype != "float32"
    same = {
        name: t == tokens["mlx regular" if own and name.startswith("mlx") else "transformers generate"]
        for name, t in tokens.items()
    }
    step = decode_step_seconds(model, tokenizer)
    ceiling = matmul.products_seconds(model)
    weight_bytes = matmul.step_weight_bytes(model)
    rows = []
    for name, (median, spread, _) in runs.items():
        rows.append(
            dict(
                pair=pair.name,
                dtype=pair.dtype,
                method=name,
                num_draft=method_num_draft(name, pair.num_draft),
                tokens=max_tokens,
                median_seconds=round(median, 4),
                spread_seconds=round(spread, 4),
                tokens_per_second=round(max_tokens / median, 2),
                same_tokens_as_transformers=same[name],
            )
        )
    speed = {row["method"]: row["tokens_per_second"] for row in rows}
    fixed = [row for row in rows if row["method"] == "mlx speculative" or row["method"].startswith("mlx k=")]
    best_fixed = max(fixed, key=lambda row: row["tokens_per_second"])
    summary = dict(
        pair=pair.name,
        dtype=pair.dtype,
        regular_vs_transformers=round(speed["mlx regular"] / speed["transformers generate"], 3),
        speculative_vs_assisted=round(speed["mlx speculative"] / speed["transformers assisted"], 3),
        speculative_vs_regular=round(speed["mlx speculative"] / speed["mlx regular"], 3),
        best_fixed_num_draft=best_fixed["num_draft"],
        auto_vs_best_fixed=round(speed["mlx auto"] / best_fixed["tokens_per_second"], 3),
        auto_vs_regular=round(speed["mlx auto"] / speed["mlx regular"], 3),
        decode_step_ms=round(step * 1e3, 3),
        step_matmuls_ms=round(ceiling * 1e3, 3),
        share_of_matmul_ceiling=round(ceiling / step, 3),
        decoder_weight_mb=round(weight_bytes / 1e6, 1),
        roofline_tokens_per_second=round(bandwidth / weight_bytes, 1),
        share_of_roofline=round(weight_bytes / bandwidth / step, 3),
        all_tokens_identical=all(same.values()) and all(row["same_tokens_as_transformers"] for row in batch_rows),
    )
    return rows + batch_rows, summary


def pairs(work, tokenizer_dir, which):
    """The model pairs to measure: random real-shaped ones, and the bundled demo pair when present."""
    found = []
    if "small-self" in which:
        small = reuse_or_write("t5-small", work / "hf-t5-small", seed=0, tokenizer_dir=tokenizer_dir)
        found.append(Pair("t5-small (own draft)", small, small, num_draft=4))
    if "base-small" in which:
        base = reuse_or_write("t5-base", work / "hf-t5-base", seed=1, tokenizer_dir=tokenizer_dir)
        small = reuse_or_write("t5-small", work / "hf-t5-small-draft", seed=0, tokenizer_dir=tokenizer_dir)
        found.append(Pair("t5-base + t5-small draft", base, small, num_draft=4))
    if "base-small-bf16" in which:
        base = reuse_or_write("t5-base", work / "hf-t5-base", seed=1, tokenizer_dir=tokenizer_dir)
        small = reuse_or_write("t5-small", work / "hf-t5-small-draft", seed=0, tokenizer_dir=tokenizer_dir)
        found.append(Pair("t5-base + t5-small draft, bfloat16", base, small, num_draft=4, dtype="bfloat16"))
    if "demo" in which and (DEMO / "main").is_dir():
        found.append(Pair("demo pair", DEMO / "main", DEMO / "draft", num_draft=1))
    return found


def print_table(rows, summaries):
    print(f"\nBLAS: {blas.active}; kernels: {kernels.active}; torch threads: {torch.get_num_threads()}")
    width = max([28] + [len(row["pair"]) + 2 for row in rows])
    print(f"{'pair':<{width}}{'method':<34}{'tok/s':>9}{'median s':>10}{'spread s':>10}  same tokens")
    for row in rows:
        speed, median, spread = (
            "n/a" if row[name] is None else f"{row[name]:.{digits}f}"
            for name, digits in (("tokens_per_second", 1), ("median_seconds", 3), ("spread_seconds", 3))
        )
        print(
            f"{row['pair']:<{width}}{row['method']:<34}{speed:>9}{median:>10}{spread:>10}  "
            f"{row['same_tokens_as_transformers']}"
        )
    print(
        f"batch {BATCH_SIZE}: {BATCH_PROMPTS} prompts, {BATCH_SIZE} at a time, tok/s over all of them; transformers' "
        "assisted generation cannot batch (it raises for a batch of more than one)"
    )
    for s in summaries:
        print(
            f"\n{s['pair']}: regular {s['regular_vs_transformers']:.2f}x transformers generate; speculative "
            f"{s['speculative_vs_assisted']:.2f}x transformers assisted ({s['speculative_vs_regular']:.2f}x regular); "
            f"decode step {s['decode_step_ms']:.2f} ms, its matmuls alone {s['step_matmuls_ms']:.2f} ms "
            f"({s['share_of_matmul_ceiling']:.0%} of the products' ceiling); roofline "
            f"{s['roofline_tokens_per_second']:.0f} tok/s for {s['decoder_weight_mb']:.0f} MB/token "
            f"({s['share_of_roofline']:.0%} reached); --num-draft auto {s['auto_vs_best_fixed']:.2f}x the best fixed "
            f"length ({s['best_fixed_num_draft']}), {s['auto_vs_regular']:.2f}x regular"
        )


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=["small-self", "base-small", "demo"],
        choices=["small-self", "base-small", "base-small-bf16", "demo", "none"],
        help="Pairs to measure: random t5-small as its own draft, random t5-base with a t5-small draft (float32, or "
        "bfloat16 here and in transformers), the demo pair; none: only the products",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens generated per run (EOS ignored)")
    parser.add_argument(
        "--num-draft",
        type=int,
        nargs="+",
        default=[1, 2, 4, 6],
        help="Fixed draft lengths timed beside --num-draft auto (and each pair's own length)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="Timed rounds of every method in turn, after one warm-up run of each"
    )
    parser.add_argument("--out", default="benchmark_out", help="Directory for results.json and results.csv")
    parser.add_argument(
        "--tokenizer",
        default=str(DEMO / "main"),
        help="Tokenizer directory for the random-weight pairs (its vocabulary must fit 32128 ids)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for transformers")
    parser.add_argument(
        "--kernel-shape",
        choices=[*matmul.KERNEL_SHAPES, "none"],
        default="t5-large",
        help="Model shape of the per-dtype decode steps and verifications (random weights); none skips them and the "
        "products' sweep",
    )
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--transformers-worker"]:
        return transformers_worker(json.loads(argv[1]))
    args = setup_arg_parser().parse_args(argv)
    if args.max_tokens < 1 or args.repeats < 1 or min(args.num_draft) < 1:
        print("error: --max-tokens, --repeats and --num-draft must be at least 1", file=sys.stderr)
        sys.exit(2)
    tokenizer_dir = Path(args.tokenizer)
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        print(
            f"error: no tokenizer in {tokenizer_dir}; pass --tokenizer with any T5 tokenizer directory", file=sys.stderr
        )
        sys.exit(2)
    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth()
    rows, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in pairs(Path(tmp), tokenizer_dir, args.pairs):
            try:
                pair_rows, summary = benchmark_pair(
                    pair, Path(tmp), args.max_tokens, args.repeats, bandwidth, args.num_draft
                )
            except convert.ConversionError as e:  # the pairs made here convert: only models/demo can be damaged
                print(f"error: {' '.join(str(e).split())}; restore {DEMO} with git checkout", file=sys.stderr)
                sys.exit(2)
            rows += pair_rows
            summaries.append(summary)
    if rows:
        print_table(rows, summaries)
    sweep, roofline = [], []
    if args.kernel_shape != "none":
        sweep = matmul.product_sweep(bandwidth)
        roofline = matmul.decode_roofline(args.kernel_shape, bandwidth)
        matmul.print_report(sweep, roofline, bandwidth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        blas=blas.active,
        kernels=kernels.active,
        memory_bandwidth_gb_s=round(bandwidth / 1e9, 2),
        max_tokens=args.max_tokens,
    )
    report = dict(meta, runs=rows, summaries=summaries, products=sweep, decode_steps=roofline)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    if rows:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"\nmemory bandwidth {bandwidth / 1e9:.1f} GB/s; results in {out}/")
    if not all(s["all_tokens_identical"] for s in summaries):
        print("error: the methods produced different tokens (see same_tokens_as_transformers)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
