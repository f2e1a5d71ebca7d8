"""Translate or summarise with T5 on MLX: a small draft T5 proposes tokens, the large T5 verifies them."""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import io
import json
import math
import os
import re
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

import kernels
from checks import is_conversion, recorded_source
from decoder import DRAFTERS, MAX_NUM_DRAFT, IncompatibleDraftError, SpeculativeDecoder, Stats
from generation import tokenize
from loader import ModelLoadError, load_model
from memory_fit import available_memory, fitting_batch_size, too_long
from prompt_file import OutputFile, PromptFileError, ResultsFileError, read_prompts, read_results

DEFAULT_MODEL = "t5-11b"
DEFAULT_DRAFT_MODEL = "t5-small"
DEFAULT_PROMPT = "translate English to German: The house is wonderful."
MODELS_DIR = Path("mlx_models")
# A small main/draft pair trained by tools/train_demo_pair.py, run when the default pair is not converted.
DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"

# "t5-small" and "google/flan-t5-small" name Hub models; "./t5", "/data/t5" and "mlx_models/t5" are paths.
HUB_NAME = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except a default of None, whose help says what it depends on."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def setup_arg_parser():
    """The command line's flags, named as the keyword arguments of SpeculativeDecoder and its generate()."""
    parser = argparse.ArgumentParser(
        description="Speculative decoding with an encoder-decoder T5 on MLX.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model-name",
        default=DEFAULT_MODEL,
        help=f"Main model: a directory written by convert.py, or a name looked up in {MODELS_DIR}/ "
        "('/' in the name becomes '-')",
    )
    parser.add_argument(
        "--draft-model-name",
        default=DEFAULT_DRAFT_MODEL,
        help="Draft model proposing tokens, with the main model's vocabulary; a directory or a name as above",
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="Input text, with T5's task prefix",
    )
    parser.add_argument(
        "--prompt-file",
        default=None,
        help="Decode every prompt in this file instead of --prompt: one prompt per line, or JSON Lines (.jsonl, or a "
        'first line that is a JSON object) with a "prompt" field; blank lines are skipped',
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="With --prompt-file: prompts decoded together; finished ones' places go to the next in the file",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="With --prompt-file: write each prompt's result to this file as one JSON line (with the prompt's index "
        "in the file) as soon as it is done, so that a stopped run keeps every finished result; the file must not "
        "exist, unless --resume",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="With --output: skip the prompts whose results the file already holds, and append the others",
    )
    parser.add_argument(
        "--max-tokens", "-m", type=int, default=100, help="Maximum number of tokens to generate (per prompt)"
    )
    parser.add_argument(
        "--num-draft",
        default="auto",
        help="Tokens drafted per verification step: a positive integer, or 'auto' to choose before every step the "
        "number (0 included) with the most expected tokens per second, from the acceptance and step times measured",
    )
    parser.add_argument(
        "--max-num-draft", type=int, default=MAX_NUM_DRAFT, help="The most tokens --num-draft auto drafts per step"
    )
    parser.add_argument(
        "--drafter",
        choices=DRAFTERS,
        default="model",
        help="What drafts: the draft model; lookup, copying what followed the output's last tokens where they occur "
        "in the prompt or the output (no draft model loaded); or hybrid, a lookup where one matches, else the model",
    )
    parser.add_argument(
        "--max-ngram", type=int, default=3, help="Longest suffix of the output a lookup matches (down to 1 token)"
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=0.0,
        help="Lenience of the acceptance test in [0, 1]; 0 keeps the main model's distribution exactly",
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed for sampling")
    parser.add_argument(
        "--regular-decode",
        action="store_true",
        help="Decode with the main model alone (the draft model is not loaded)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens; 0 is off")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass in (0, 1]; 1 is off")
    parser.add_argument("--ignore-eos", action="store_true", help="Keep generating past the end-of-sequence token")
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print one JSON object (text, tokens, stats, settings) instead of streaming the text",
    )
    return parser


def fail(message):
    """Print `message` as one `error:` line on stderr and exit with status 2."""
    rank = mx.distributed.init().rank()
    if rank > 0:  # silenced in main(), but a rank's own failure (its files, its machine) must show
        print(f"error: rank {rank}: " + " ".join(message.split()), file=sys.__stderr__)
        sys.exit(2)
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """The first flag value the decoder would reject, as a message; None when all are valid."""
    checks = [
        (args.prompt.strip(), "--prompt is empty; pass the text to translate or summarise"),
        (args.max_tokens >= 1, f"--max-tokens must be at least 1, got {args.max_tokens}"),
        (not args.output or args.prompt_file, "--output writes the results of a --prompt-file run; pass --prompt-file"),
        (not args.resume or args.output, "--resume continues an --output file; pass --output with the file to resume"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (
            args.num_draft == "auto" or (args.num_draft.isdigit() and int(args.num_draft) >= 1),
            f"--num-draft must be a positive integer or auto, got {args.num_draft!r}",
        ),
        (args.max_num_draft >= 1, f"--max-num-draft must be at least 1, got {args.max_num_draft}"),
        (
            args.max_ngram >= 1,
            f"--max-ngram must be at least 1 (a lookup matches at least one token), got {args.max_ngram}",
        ),
        (0 <= args.delta <= 1, f"--delta must be between 0 and 1, got {args.delta}"),
        (
            args.temperature >= 0 and math.isfinite(args.temperature),
            f"--temperature must be 0 (greedy) or positive, got {args.temperature}",
        ),
        (args.top_k >= 0, f"--top-k must be 0 (off) or positive, got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], with 1 meaning off, got {args.top_p}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def is_path(name):
    """Whether `name` names a directory rather than a Hub model."""
    parent = Path(name).parent
    return not HUB_NAME.fullmatch(name) or (parent != Path(".") and (parent == MODELS_DIR or parent.is_dir()))


def model_path(name):
    """The converted directory `name` refers to: itself if a path or a directory, else mlx_models/<name>."""
    if is_path(name) or Path(name).is_dir():
        return Path(name)
    return MODELS_DIR / name.replace("/", "-")


def convert_command(name, path):
    """The convert.py command that writes `path`, the directory `name` refers to."""
    # For an explicit directory, its last component is the best guess at the Hub name.
    hub_name = Path(name).name if is_path(name) else name
    command = f"python convert.py --model {hub_name}"
    if path.resolve() != (MODELS_DIR / hub_name.replace("/", "-")).resolve():
        command += f" --mlx-path {path}"
    return command


def find_model(name, role):
    """The converted directory `name` refers to; exits with the command that writes it when it is missing."""
    path = model_path(name)
    if not path.is_dir():
        fail(f"no converted {role} model at {path}; create it with: {convert_command(name, path)}")
    return path


def converted_since(path, source):
    """Whether `path` holds a conversion of the checkpoint `source` made since its weights last changed."""
    config, weights = path / "config.json", source / "model.safetensors"
    return config.is_file() and weights.is_file() and config.stat().st_mtime >= weights.stat().st_mtime


def demo_pair(args):
    """Switch `args` to the bundled demo pair, converted on first use: its two directories."""
    import convert

    print(
        f"no converted {DEFAULT_MODEL} in {MODELS_DIR}/, so running the bundled demo pair {DEMO_DIR} "
        f"(English to German, on a small vocabulary); for the real pair: python convert.py --model {DEFAULT_MODEL} && "
        f"python convert.py --model {DEFAULT_DRAFT_MODEL}",
        file=sys.stderr,
    )
    pair = [(MODELS_DIR / f"demo-{role}", DEMO_DIR / role) for role in ("main", "draft")]
    # Converted again when the bundled weights are newer (retrained, or updated by git).
    stale = [(path, source) for path, source in pair if not converted_since(path, source)]
    for path, source in stale:
        # Replaced only if it holds nothing but an earlier conversion of the demo: never a directory of the user's.
        if path.exists() and not (is_conversion(path) and recorded_source(path) == str(source)):
            fail(
                f"{path} is in the way of the bundled demo pair and is not its conversion; move it elsewhere, "
                "or pass --model-name and --draft-model-name"
            )
    if stale:
        print(f"converting the demo pair into {', '.join(str(path) for path, _ in stale)}", file=sys.stderr)
    for path, source in stale:
        try:
            # Quietly: convert.py's progress bar and summary would mix with the generated text.
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                convert.convert(str(source), mlx_path=str(path), force=True)
        except convert.ConversionError as e:
            fail(f"cannot convert the bundled demo pair: {e}")
    return [path for path, _ in pair]


def load(path, role, group=None):
    """(model, tokenizer) from `path`, sharded over `group`; exits saying what is wrong and what to run when it
    cannot be loaded."""
    print(f"loading {role} model from {path}", file=sys.stderr)
    try:
        return load_model(path, group=group)[:2]
    except ModelLoadError as e:
        fail(f"cannot load the {role} model: {e}")


def backend_description():
    """Where MLX computes, with which BLAS and matrix-product kernels on a CPU."""
    device = mx.default_device()
    if device != mx.cpu:
        return device.type.name
    return f"cpu, BLAS {blas.active}, kernels {kernels.description()}"


def print_json(report, model_dir, draft_dir):
    """Print `report` (its "stats" with what computed them: backend, BLAS, kernels) and the models as one JSON line."""
    computed_by = dict(backend=backend_description(), blas=blas.active, kernels=kernels.active)
    stats = {**report["stats"], **computed_by, "kernels_ran": sorted(kernels.used)}
    models = dict(model=str(model_dir), draft_model=str(draft_dir) if draft_dir else None)
    print(json.dumps({**report, "stats": stats, **models}))


def print_stats(stats, regular):
    print("=" * 10)
    if not regular:
        print(f"Acceptance: {stats.accepted}/{stats.drafted} drafted tokens ({stats.acceptance_rate:.1%})")
        print(f"Drafts per step: {stats.mean_num_draft:.2f} ({stats.lookup_share:.0%} from lookup)")
    print(f"Main-model calls: {stats.main_calls}")
    print(f"Generation: {stats.generated} tokens, {stats.tokens_per_second:.1f} tokens-per-sec")
    print(f"Time: {stats.seconds:.3f} s")
    print(f"Backend: {backend_description()}")


# The --prompt-file run in progress: (prompts done, prompts, --output file or None), for the line a Ctrl-C prints.
progress_of_run = None


def interrupted(signum, frame):
    """Ctrl-C: exit at once with status 130 (a KeyboardInterrupt raised inside MLX's native code can vanish), with a
    line saying what a --prompt-file run finished and kept."""
    if progress_of_run is not None:
        done, total, output = progress_of_run()
        if output is not None:
            print(f"\ninterrupted: {output.summary()}; add --resume to finish the rest", file=sys.stderr)
        else:
            print(f"\ninterrupted: {done} of {total} prompts done, none kept (--output keeps them)", file=sys.stderr)
    os._exit(130)


def run_prompt_file(decoder, prompts, args, options, results, output=None):
    """Decode the `prompts` that `results` (index -> result) lacks, in batches; text mode prints each output in prompt
    order as soon as it and those before it are done (a progress bar on stderr), --json nothing. A prompt too long for
    the memory gets an "error" as its result. Each result also goes to `output`, in prompt order, as soon as it and
    those before it are done. Returns (every
    result in prompt order, run stats)."""
    global progress_of_run
    stats = Stats()
    results, earlier = dict(results), set(results)
    printed = written = 0
    progress = tqdm(total=len(prompts), unit="prompt", desc="prompts", file=sys.stderr, disable=args.json)

    def state():
        return len(results), len(prompts), output

    def finish(result):
        results[result["index"]] = result
        write_ready()
        progress.update()
        print_ready()

    def write_ready():
        # In file order: a result that finished early waits for the ones before it.
        nonlocal written
        while output is not None and written < len(prompts) and written in results:
            if written not in earlier:
                output.write(results[written])
            written += 1

    def print_ready():
        nonlocal printed
        while not args.json and printed < len(prompts) and printed in results:
            done = results[printed]
            if "error" in done:
                progress.write(f"=== prompt {printed + 1}/{len(prompts)}: error: {done['error']}\n", file=sys.stdout)
            else:
                tokens = len(done["tokens"])
                progress.write(f"=== prompt {printed + 1}/{len(prompts)} ({tokens} tokens)", file=sys.stdout)
                progress.write(done["text"] + "\n", file=sys.stdout)
            printed += 1

    progress_of_run = state
    progress.update(len(results))
    print_ready()
    models = [decoder.model] + ([decoder.draft_model] if decoder.draft_model is not None else [])
    available = available_memory()
    runnable, lengths = [], []
    for index in (index for index in range(len(prompts)) if index not in results):
        length = len(tokenize(decoder.tokenizer, prompts[index]))
        message = too_long(models, length, args.max_tokens, available)
        if message:
            finish(dict(index=index, prompt=prompts[index], error=message))
        else:
            runnable.append(index)
            lengths.append(length)
    batch_size = fitting_batch_size(models, lengths, args.batch_size, args.max_tokens, available)
    if batch_size < args.batch_size:
        print(f"note: decoding {batch_size} prompts at a time: {args.batch_size} do not fit in memory", file=sys.stderr)
    # Each prompt samples from the random stream of its place in the file: the same in a resumed run.
    streams = (runnable, len(prompts))
    batch = decoder.batch_generations(
        [prompts[i] for i in runnable], batch_size=batch_size, stats=stats, streams=streams, **options
    )
    for position, generation in batch:
        index = runnable[position]
        result = dict(index=index, prompt=prompts[index], text=generation.text, tokens=generation.tokens)
        finish({**result, "stats": generation.stats.to_dict()})
    progress.close()
    progress_of_run = None
    return [results[index] for index in range(len(prompts))], stats


def main(argv=None):
    # Under mlx.launch every rank runs all of this with the same flags and seed; the main model is sharded across
    # the ranks and only rank 0 prints. Started alone, the group is this one process.
    group = mx.distributed.init()
    if group.rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    args = setup_arg_parser().parse_args(argv)
    message = check_args(args)
    if message:
        fail(message)
    try:
        prompts = read_prompts(args.prompt_file) if args.prompt_file else None
    except PromptFileError as e:
        fail(f"{e}")
    earlier_results = {}
    if args.output:
        output_path = Path(args.output)
        if output_path.exists() and not args.resume:
            fail(f"{output_path} exists; add --resume to continue the run that wrote it, or pass another --output")
        if args.resume:
            try:
                earlier_results = read_results(output_path, prompts)
            except ResultsFileError as e:
                fail(f"{e}")

    default_pair = (args.model_name, args.draft_model_name) == (DEFAULT_MODEL, DEFAULT_DRAFT_MODEL)
    demo = default_pair and not model_path(DEFAULT_MODEL).is_dir()
    if demo:
        model_dir, draft_dir = demo_pair(args)
    else:
        # Find both directories before loading either: a missing draft should not wait for the main model.
        model_dir = find_model(args.model_name, "main")
        if not args.regular_decode and args.drafter != "lookup":
            draft_dir = find_model(args.draft_model_name, "draft")
    if args.num_draft != "auto":
        args.num_draft = int(args.num_draft)
    if args.regular_decode or args.drafter == "lookup":
        draft_dir = None
    model, tokenizer = load(model_dir, "main", group)
    draft_model = draft_tokenizer = None
    if draft_dir:
        draft_model, draft_tokenizer = load(draft_dir, "draft")

    settings = dict(
        drafter=args.drafter,
        num_draft=args.num_draft,
        max_num_draft=args.max_num_draft,
        max_ngram=args.max_ngram,
        delta=args.delta,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        decoder = SpeculativeDecoder(model, draft_model, tokenizer, draft_tokenizer=draft_tokenizer, **settings)
    except IncompatibleDraftError as e:
        fail(f"{e}; pick a --draft-model-name that shares the main model's tokenizer, or use --regular-decode")

    options = dict(max_tokens=args.max_tokens, regular=args.regular_decode, ignore_eos=args.ignore_eos)
    if prompts is not None:
        try:
            output = OutputFile(output_path, len(prompts), len(earlier_results)) if args.output else None
        except ResultsFileError as e:
            fail(f"{e}")
        results, stats = run_prompt_file(decoder, prompts, args, options, earlier_results, output)
        refused = sum("error" in result for result in results)
        if args.json:
            run_stats = {**stats.to_dict(), "prompts": len(prompts), "refused": refused, "batch_size": args.batch_size}
            report = dict(
                results=results, stats=run_stats, settings={**settings, **options, "batch_size": args.batch_size}
            )
            print_json(report, model_dir, draft_dir)
        else:
            print(f"Prompts: {len(prompts)}, {args.batch_size} at a time")
            if refused:
                print(f"Refused: {refused} (too long for the memory)")
            print_stats(stats, args.regular_decode)
        return
    models = [model] + ([draft_model] if draft_model is not None else [])
    message = too_long(models, len(tokenize(tokenizer, args.prompt)), args.max_tokens, available_memory())
    if message:
        fail(message)
    stream = None if args.json else lambda piece: print(piece, end="", flush=True)
    generation = decoder.generate(args.prompt, stream=stream, **options)

    if args.json:
        report = dict(text=generation.text, tokens=generation.tokens, stats=generation.stats.to_dict())
        print_json({**report, "prompt": args.prompt, "settings": {**settings, **options}}, model_dir, draft_dir)
    else:
        print()
        print_stats(generation.stats, args.regular_decode)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted)
    main()
