"""Soak check: one process decodes the same prompts in batches, over and over, for `--minutes`.

Every pass must give the tokens of the first, token for token, and resident memory (sampled once a minute) must not
grow by more than `--max-growth` after the warm-up minutes. Prints one line a minute and a summary; exit code 1 when
either fails. Outside the test suite: it is meant to run for half an hour.

    python -m tools.soak --minutes 30
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import io
import json
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import convert
import kernels
from checks import is_conversion
from decoder import SpeculativeDecoder
from loader import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"


def resident_mib() -> float:
    """This process's resident memory now (not its peak), in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def load(path: str, scratch: Path):
    """(model, tokenizer) from `path`, converted into `scratch` first where it is a transformers checkpoint."""
    if (Path(path) / "config.json").exists() and not is_conversion(Path(path)):
        converted = scratch / Path(path).name
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            path = convert.convert(path, mlx_path=str(converted), force=True)
    return load_model(path)[:2]


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(DEMO / "main"), help="main model directory (MLX or transformers)")
    parser.add_argument(
        "--draft-model", default=str(DEMO / "draft"), help="draft model directory (MLX or transformers)"
    )
    parser.add_argument(
        "--prompt-file",
        default=str(DEMO / "prompts.txt"),
        help='one prompt per line, or JSON Lines with a "prompt" field',
    )
    parser.add_argument("--minutes", type=float, default=30, help="how long to decode")
    parser.add_argument("--warm-up", type=float, default=2, help="minutes before the memory baseline is taken")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded at once")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0 sampled with --seed")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed, the same every pass")
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed growth of resident memory")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.minutes <= 0 or args.warm_up < 0 or args.warm_up >= args.minutes:
        print("error: --warm-up must be at least 0 and below --minutes (> 0); pass e.g. --minutes 30", file=sys.stderr)
        return 2
    try:
        lines = [line for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        # One prompt a line, or JSON Lines with a "prompt" field (as models/demo/prompts.txt)
        prompts = [json.loads(line)["prompt"] if line.startswith("{") else line for line in lines]
        with tempfile.TemporaryDirectory() as scratch:
            model, tokenizer = load(args.model, Path(scratch))
            draft_model, _ = load(args.draft_model, Path(scratch))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, ModelLoadError, convert.ConversionError) as e:
        print(f"error: {e}; pass existing --model, --draft-model and --prompt-file", file=sys.stderr)
        return 2
    if not prompts:
        print(f"error: {args.prompt_file} has no prompts; write one per line", file=sys.stderr)
        return 2
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, temperature=args.temperature, seed=args.seed)
    print(f"{len(prompts)} prompts, batch {args.batch_size}, {args.max_tokens} tokens each; kernels: {kernels.active}")

    start = time.perf_counter()
    first, passes, differing = None, 0, 0
    samples = []  # (minute, resident MiB)
    next_sample = 0.0
    while True:
        elapsed = (time.perf_counter() - start) / 60
        if elapsed >= next_sample or elapsed >= args.minutes:
            samples.append((elapsed, resident_mib()))
            print(f"minute {elapsed:5.1f}: {passes} passes, {differing} differing, resident {samples[-1][1]:.0f} MiB")
            sys.stdout.flush()
            next_sample += 1
        if elapsed >= args.minutes:
            break
        generations = decoder.generate_batch(
            prompts, max_tokens=args.max_tokens, batch_size=args.batch_size, ignore_eos=True
        )
        tokens = [generation.tokens for generation in generations]
        if first is None:
            first = tokens
        elif tokens != first:
            differing += 1
        passes += 1

    after_warm_up = [rss for minute, rss in samples if minute >= args.warm_up]
    baseline, last, peak = after_warm_up[0], after_warm_up[-1], max(after_warm_up)
    growth = peak / baseline - 1
    print(
        f"summary: {passes} passes in {args.minutes:g} min, {differing} differing from the first; resident memory "
        f"{baseline:.0f} MiB at minute {args.warm_up:g}, {last:.0f} MiB at the end, peak {peak:.0f} MiB "
        f"({growth:+.1%} against {args.max_growth:.0%} allowed)"
    )
    failed = differing > 0 or growth > args.max_growth
    print("FAIL" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
