"""Where a decoding step's time goes, and the decoding loop against CTranslate2's greedy decoding, in one run.

Per pair, float32:
- the main and the draft model's decoder step (`model.decode` of one row, and its greedy choice computed at once as
  the loop computes drafts and verifications; of the k + 1 rows of a verification, of a batch of rows at their own
  lengths), the time of its matrix products alone (what the kernels cost) and the number
  of MLX operations it builds (what each costs a few microseconds of scheduling);
- the decoding loop's share beyond the model's steps: a run's time (encoders excluded) over the sum of its steps, each
  call of the main and draft model timed alone at the shape the run made it, right after the run; the median over
  every prompt and round;
- regular decoding and main.py's default speculative decoding against CTranslate2's greedy decoding of the main model
  on the same prompts (the pair's held-out ones), EOS ignored, tokens compared; methods alternate round by round.

With --dtypes, the step times again for the pair converted to each (bfloat16, float16, 8-bit, 4-bit), with the native
layers and with MLX's operations per layer (T5_FUSED_LAYERS=0), each setting timed in turn.

    python -m benchmarks.decode_step --pairs demo small-self --dtypes bfloat16 float16 8-bit 4-bit --out benchmark_out
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx

import convert
import decoder as decoder_module
import kernels
from benchmarks import matmul
from decoder import SpeculativeDecoder
from loader import load_model
from prompt_file import read_prompts

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
PAUSE = 0.3  # seconds between timed runs: the kernel threads of the run before stop spinning
BATCH_ROWS = 8
VERIFY_ROWS = 5  # k + 1 for main.py's typical draft lengths
TRANSLATIONS = 16  # the demo pair's held-out translations whose loop is timed to the EOS (the last of its prompts)


def step_setup(model, rows, prompt_length, context):
    """Cross-attention keys/values of `rows` prompts and a cache holding `context` tokens of each (the rows of a batch
    at their own lengths: row b holds context + b)."""
    cross_kv = model.cross_kv(model.encode(mx.full((rows, prompt_length), 3)))
    cache = model.make_cache(rows)
    mx.eval(model.decode(mx.full((rows, context + rows - 1), 3), cross_kv, cache))
    for layer_cache in cache:
        layer_cache.trim_rows(list(range(rows - 1, -1, -1)))
        # Room for the steps to come: no timed or counted step is one that grows the cache (a rare step).
        keys = layer_cache.keys
        layer_cache.reserve((rows, keys.shape[1], 16, keys.shape[3]), keys.dtype)
    mx.eval([(layer_cache.keys, layer_cache.values) for layer_cache in cache])
    return cross_kv, cache


def step_seconds(model, rows=1, tokens=1, prompt_length=32, context=32, repeats=50, choices=False, now=False):
    """Median seconds of one `model.decode` call (with choices, of `model.greedy_choices`, a greedy step's; with now
    too, computed as the decoding loop computes drafts and verifications: before the call returns, see
    kernels.decoder_layers) of `tokens` new tokens for each of `rows` rows, evaluated, the cache rewound after each
    call."""
    cross_kv, cache = step_setup(model, rows, prompt_length, context)
    inputs = mx.full((rows, tokens), 3, dtype=mx.int32)
    mx.eval(inputs)
    if now:
        step = functools.partial(model.greedy_choices, now=True)
    else:
        step = model.greedy_choices if choices else model.decode

    def call():
        mx.eval(step(inputs, cross_kv, cache))
        for layer_cache in cache:
            layer_cache.trim(tokens)

    return matmul.seconds(call, repeats)


def operation_count(model, rows=1, tokens=1):
    """The MLX operations one decode call builds, by kind."""
    cross_kv, cache = step_setup(model, rows, 32, 32)
    logits = model.decode(mx.full((rows, tokens), 3), cross_kv, cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(path), logits)
        kinds = Counter(re.findall(r'label ="(\w+)", shape=rectangle', path.read_text()))
    mx.eval(logits)
    return kinds


def model_steps(model, name):
    """Step times (ms) of one model: one row (its logits, and its greedy choice computed at once as the decoding loop
    computes drafts and verifications), a verification's rows, a batch; its products alone; its operations."""
    steps = dict(
        one_row_ms=step_seconds(model) * 1e3,
        one_row_now_ms=step_seconds(model, now=True) * 1e3,
        verify_ms=step_seconds(model, tokens=VERIFY_ROWS) * 1e3,
        batch_ms=step_seconds(model, rows=BATCH_ROWS) * 1e3,
        products_ms=matmul.products_seconds(model, 1, 50) * 1e3,
        operations=sum(operation_count(model).values()),
    )
    return {f"{name}_{key}": round(value, 3) for key, value in steps.items()}


class CallLog:
    """Records the shape (rows, tokens) of every decode call of a model and of every greedy choices call, and (tokens
    fed, tokens drafted) of every greedy drafting call; and, into `calls_made` where given (one list for both models
    of a pair, in the order of the run), each call with its inputs and the length its cache held, to make again."""

    METHODS = ("decode", "greedy_choices", "greedy_draft")

    def __init__(self, model, calls_made=None):
        self.model, self.calls, self.choices, self.drafts = model, Counter(), Counter(), Counter()
        self.calls_made = calls_made
        self.methods = {name: getattr(model, name) for name in self.METHODS}
        self.own = {name: vars(model)[name] for name in self.METHODS if name in vars(model)}  # set on the instance

    def __enter__(self):
        def logger(name):
            method = self.methods[name]

            def logged(decoder_ids, cross_kv, cache, *args, **kwargs):
                offset = cache[0].offset
                result = method(decoder_ids, cross_kv, cache, *args, **kwargs)
                if result is None:  # (the native layers do not apply: the caller computes it otherwise)
                    return None
                if name == "decode":
                    self.calls[tuple(decoder_ids.shape)] += 1
                elif name == "greedy_choices":
                    self.choices[tuple(decoder_ids.shape)] += 1
                else:
                    self.drafts[decoder_ids.shape[1], args[0]] += 1
                if self.calls_made is not None:
                    self.calls_made.append((self.model, method, decoder_ids, cross_kv, cache, offset, args, kwargs))
                return result

            return logged

        for name in self.METHODS:
            setattr(self.model, name, logger(name))
        return self

    def __exit__(self, *exc):
        for name in self.methods:
            if name in self.own:
                setattr(self.model, name, self.own[name])
            else:
                delattr(self.model, name)


def replay_seconds(calls_made):
    """Seconds of a run's model calls (CallLog.calls_made) made again in their order, each evaluated on its own: the
    same inputs, each model's cache (a fresh one) rewound to the length the call met in the run. Nothing else runs:
    this is the sum of the run's steps."""
    fresh = {}
    for model, _, decoder_ids, _, cache, *_ in calls_made:
        if id(cache) not in fresh:
            fresh[id(cache)] = model.make_cache(decoder_ids.shape[0])
    start = time.perf_counter()
    for _, method, decoder_ids, cross_kv, cache, offset, args, kwargs in calls_made:
        replayed = fresh[id(cache)]
        excess = replayed[0].offset - offset
        if excess:
            for layer_cache in replayed:
                layer_cache.trim(excess)
        mx.eval(method(decoder_ids, cross_kv, replayed, *args, **kwargs))
    return time.perf_counter() - start


class StepClock:
    """Within a run, the seconds the host spends on the model's steps: building and starting the main model's steps
    (SpeculativeDecoder.plain_step and .step, a greedy verification at delta 0 computed in it), the draft model's calls,
    and waiting for their values (decoder.waited). What the run spends beyond them, its prompt's tokenizing and
    encoding left out (Stats.encode_seconds), is the loop's own: the draft-length policy, the drafter's bookkeeping,
    acceptance beyond the verification, stats, detokenizing, the generators. Only the outermost of nested calls
    counts."""

    def __init__(self, decoder):
        self.seconds, self.depth = 0.0, 0
        self.patched = [(decoder, "plain_step"), (decoder, "step"), (decoder_module, "waited")]
        if decoder.draft_model is not None:
            self.patched += [(decoder.draft_model, name) for name in CallLog.METHODS]
        self.saved = []

    def timed(self, function):
        def clocked(*args, **kwargs):
            if self.depth:
                return function(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.depth -= 1

        return clocked

    def __enter__(self):
        for owner, name in self.patched:
            self.saved.append((owner, name, vars(owner).get(name)))
            setattr(owner, name, self.timed(getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, own in reversed(self.saved):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self.saved = []


def loop_share(decoder, prompts, max_tokens, regular, repeats, to_eos=False):
    """The decoding loop's share beyond its model steps, two ways, each the median over `repeats` rounds of the prompts
    (and the last run's stats):
    - within each run: its time (encoders excluded) over the host's time on the model's steps in it (StepClock),
      minus 1: what the loop itself costs, unmoved by the machine's speed, which moves both alike;
    - against the same model calls made again alone after the run (replay_seconds), minus 1. Both start after the same
      pause, so that both meet the machine alike: a pause slows what follows it for a while (on the 2-core AVX-512
      box, the steps after 0.3 s idle ran about 1.5x slower than back to back), which steps timed in a loop of their
      own never see. A step made again alone includes building it, which the loop overlaps with the step before; and
      the machine's speed moves between a run and its replay: the same setting gave -34% and +16% in two runs.
    The run timed is the one whose calls are logged (auto's choices differ from run to run), so the logging's own
    Python counts as loop in the second way (StepClock's own, a few microseconds a step, in the first). `to_eos`: each
    run ends at its EOS (main.py's), else it decodes max_tokens past it."""
    ignore_eos = not to_eos
    decoder.generate(prompts[0], max_tokens=max_tokens, regular=regular, ignore_eos=ignore_eos)  # warm-up, auto's
    shares, own_shares = [], []
    for _ in range(repeats):
        for prompt in prompts:
            calls_made = []
            logs = [CallLog(decoder.model, calls_made)]
            if not regular:
                logs.append(CallLog(decoder.draft_model, calls_made))
            for log in logs:
                log.__enter__()
            time.sleep(PAUSE)
            try:
                with StepClock(decoder) as clock:
                    generation = decoder.generate(prompt, max_tokens=max_tokens, regular=regular, ignore_eos=ignore_eos)
            finally:
                for log in logs:
                    log.__exit__()
            time.sleep(PAUSE)
            steps = replay_seconds(calls_made)
            loop = generation.stats.seconds - generation.stats.encode_seconds
            shares.append(loop / steps - 1)
            own_shares.append(loop / clock.seconds - 1)
    return statistics.median(own_shares), statistics.median(shares), generation.stats


# CTranslate2 runs in a process of its own: in this one, torch's OpenMP threads (started by the converter's tensor
# operations) and CTranslate2's spin against each other on the same cores, and its greedy decoding of the demo main
# model ran 10x slower (about 170 against 1,900-2,500 tokens/s alone, this machine). The child reads one request a
# line (JSON) and answers with the tokens.
CTRANSLATE2_WORKER = """
import json, sys
import ctranslate2
translator = ctranslate2.Translator(sys.argv[1], device="cpu", compute_type=sys.argv[2], inter_threads=1,
                                    intra_threads=int(sys.argv[3]))
for line in sys.stdin:
    request = json.loads(line)
    result = translator.translate_batch([request["source"]], beam_size=1, return_end_token=True,
                                        max_decoding_length=request["max"], min_decoding_length=request["min"],
                                        end_token=request["end"])
    print(json.dumps(result[0].hypotheses[0]), flush=True)
"""


class CTranslate2Greedy:
    """CTranslate2's greedy decoding of a transformers checkpoint, converted once, on the CPU: in float32, or in the
    `quantization` its converter and runtime take (int8, ...), in a process of its own (CTRANSLATE2_WORKER)."""

    def __init__(self, checkpoint, work, tokenizer, quantization="float32", random_weights=False):
        import ctranslate2

        path = work / f"ct2-{quantization}"
        if not (path / "model.bin").exists():
            ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(
                str(path), quantization=quantization, force=True
            )
        threads = kernels.native.threads() if kernels.native else os.cpu_count()
        self.worker = subprocess.Popen(
            [sys.executable, "-c", CTRANSLATE2_WORKER, str(path), quantization, str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.tokenizer = tokenizer
        self.random_weights = random_weights

    def generate(self, prompt, max_tokens, until_eos=False):
        """The token ids of greedy decoding up to the EOS (included) or max_tokens where `until_eos`, as this
        project's decoding ends. Otherwise exactly max_tokens tokens, EOS decoded past as this project's ignore_eos
        does: a trained model's decoding is ended by the decoder start token, which it never chooses
        (CTranslate2 never chooses an end token before the minimum length, so EOS must not be it). A model with random
        weights chooses that token most of all; its decoding is ended by EOS, not before max_tokens (it chooses EOS
        too seldom for that to matter; the tokens are compared)."""
        source = self.tokenizer.convert_ids_to_tokens(self.tokenizer(prompt).input_ids)
        end = self.tokenizer.eos_token if self.random_weights or until_eos else self.tokenizer.pad_token
        shortest = max_tokens if self.random_weights and not until_eos else 0
        request = dict(source=source, max=max_tokens, min=shortest, end=end)
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        answer = self.worker.stdout.readline()
        if not answer:
            raise RuntimeError(f"the CTranslate2 process ended (exit status {self.worker.wait()})")
        return self.tokenizer.convert_tokens_to_ids(json.loads(answer))

    def close(self):
        """Ends the CTranslate2 process."""
        if self.worker.poll() is None:
            self.worker.stdin.close()
            self.worker.wait()


def against_ctranslate2(decoder, ctranslate2_greedy, prompts, max_tokens, repeats):
    """tok/s of regular and default speculative decoding and of CTranslate2's greedy decoding over all prompts,
    methods alternating round by round; whether each produced CTranslate2's tokens."""

    def mlx_run(regular):
        return lambda prompt: decoder.generate(prompt, max_tokens=max_tokens, regular=regular, ignore_eos=True).tokens

    methods = {
        "regular": mlx_run(True),
        "speculative": mlx_run(False),
        "ctranslate2 greedy": lambda prompt: ctranslate2_greedy.generate(prompt, max_tokens),
    }
    times = {name: [] for name in methods}
    tokens = {name: [run(prompt) for prompt in prompts] for name, run in methods.items()}  # warm-up
    for _ in range(repeats):
        for name, run in methods.items():
            time.sleep(PAUSE)
            start = time.perf_counter()
            tokens[name] = [run(prompt) for prompt in prompts]
            times[name].append(time.perf_counter() - start)
    total = len(prompts) * max_tokens
    speed = {name: total / statistics.median(t) for name, t in times.items()}
    same = {name: tokens[name] == tokens["ctranslate2 greedy"] for name in methods}
    return speed, same


def pair_sources(name, work):
    """(main checkpoint, draft checkpoint, prompts) of a pair, as transformers checkpoints."""
    lines = read_prompts(DEMO / "prompts.txt")
    if name == "demo":
        return DEMO / "main", DEMO / "draft", lines
    from tools.random_checkpoint import reuse_or_write

    small = reuse_or_write("t5-small", work / "hf-t5-small", seed=0)
    return small, small, lines


def measure_pair(name, work, prompts, max_tokens, repeats):
    main_dir, draft_dir, lines = pair_sources(name, work)
    prompts = [lines[i % len(lines)] for i in range(prompts)]
    model, tokenizer, _ = load_model(convert.convert(str(main_dir), str(work / f"{name}-main"), force=True))
    draft_model, _, _ = load_model(convert.convert(str(draft_dir), str(work / f"{name}-draft"), force=True))
    row = dict(pair=name, kernels=kernels.active)
    row.update(model_steps(model, "main"))
    row.update(model_steps(draft_model, "draft"))
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft="auto")  # main.py's settings
    regular_share, regular_replay, _ = loop_share(decoder, prompts, max_tokens, True, repeats)
    speculative_share, speculative_replay, stats = loop_share(decoder, prompts, max_tokens, False, repeats)
    row.update(
        regular_loop_share=round(regular_share, 3),
        speculative_loop_share=round(speculative_share, 3),
        regular_loop_share_replayed=round(regular_replay, 3),
        speculative_loop_share_replayed=round(speculative_replay, 3),
        speculative_mean_num_draft=round(stats.mean_num_draft, 2),
    )
    if name == "demo":
        # Past EOS the draft seldom agrees and auto drafts little: the loop with drafts is the translations' own.
        translations = lines[-TRANSLATIONS:]
        regular_share, _, _ = loop_share(decoder, translations, max_tokens, True, repeats, to_eos=True)
        speculative_share, _, stats = loop_share(decoder, translations, max_tokens, False, repeats, to_eos=True)
        row.update(
            translation_regular_loop_share=round(regular_share, 3),
            translation_speculative_loop_share=round(speculative_share, 3),
            translation_mean_num_draft=round(stats.mean_num_draft, 2),
        )
    ctranslate2_greedy = CTranslate2Greedy(main_dir, work / name, tokenizer, random_weights=name != "demo")
    speed, same = against_ctranslate2(decoder, ctranslate2_greedy, prompts, max_tokens, repeats)
    ctranslate2_greedy.close()
    row.update({f"{method}_tok_s": round(value, 1) for method, value in speed.items()})
    row.update(
        regular_vs_ctranslate2=round(speed["regular"] / speed["ctranslate2 greedy"], 3),
        speculative_vs_ctranslate2=round(speed["speculative"] / speed["ctranslate2 greedy"], 3),
        regular_same_tokens=same["regular"],
        speculative_same_tokens=same["speculative"],
    )
    return row


# --dtypes: convert.py's options for each
DTYPES = {
    "bfloat16": dict(dtype="bfloat16"),
    "float16": dict(dtype="float16"),
    "8-bit": dict(quantize=True, q_bits=8),
    "4-bit": dict(quantize=True, q_bits=4),
}


def dtype_steps(name, work, dtype):
    """One row, verification and batch step times (ms) of the pair's models converted to `dtype`, native layers on
    and off in turn (the median of three rounds)."""
    main_dir, draft_dir, _ = pair_sources(name, work)
    row = dict(pair=name, dtype=dtype)
    for role, source in (("main", main_dir), ("draft", draft_dir)):
        path = convert.convert(str(source), str(work / f"{name}-{role}-{dtype}"), force=True, **DTYPES[dtype])
        model, _, _ = load_model(path)
        shapes = {"one_row": dict(), "verify": dict(tokens=VERIFY_ROWS), "batch": dict(rows=BATCH_ROWS)}
        times = {(fused, shape): [] for fused in (True, False) for shape in shapes}
        before = kernels.fused_layers
        try:
            for _ in range(3):
                for fused, shape in times:
                    kernels.fused_layers = fused
                    times[fused, shape].append(step_seconds(model, repeats=20, **shapes[shape]))
        finally:
            kernels.fused_layers = before
        for (fused, shape), seconds in times.items():
            row[f"{role}_{shape}_{'native' if fused else 'mlx'}_ms"] = round(statistics.median(seconds) * 1e3, 3)
    return row


def print_dtype_row(row):
    print(f"\n{row['pair']} in {row['dtype']}: step ms, native layers (MLX operations per layer)")
    for model in ("main", "draft"):
        print(
            f"  {model:<6} "
            + ", ".join(
                f"{label} {row[f'{model}_{shape}_native_ms']:.3f} ({row[f'{model}_{shape}_mlx_ms']:.3f})"
                for shape, label in (
                    ("one_row", "one row"),
                    ("verify", f"{VERIFY_ROWS} tokens"),
                    ("batch", f"{BATCH_ROWS} rows"),
                )
            )
        )


def print_row(row):
    print(f"\n{row['pair']} (float32; kernels: {row['kernels']})")
    for model in ("main", "draft"):
        print(
            f"  {model:<6} step: one row {row[f'{model}_one_row_ms']:.3f} ms (greedy, computed at once "
            f"{row[f'{model}_one_row_now_ms']:.3f} ms), {VERIFY_ROWS} tokens "
            f"{row[f'{model}_verify_ms']:.3f} ms, {BATCH_ROWS} rows {row[f'{model}_batch_ms']:.3f} ms; products alone "
            f"{row[f'{model}_products_ms']:.3f} ms; {row[f'{model}_operations']} operations"
        )
    print(
        f"  loop beyond the steps: regular {row['regular_loop_share']:+.1%}, speculative "
        f"{row['speculative_loop_share']:+.1%} (mean {row['speculative_mean_num_draft']} drafts per step); against "
        f"its calls made again alone: regular {row['regular_loop_share_replayed']:+.1%}, speculative "
        f"{row['speculative_loop_share_replayed']:+.1%}"
    )
    if "translation_regular_loop_share" in row:
        print(
            f"  loop beyond the steps, {TRANSLATIONS} translations to the EOS: regular "
            f"{row['translation_regular_loop_share']:+.1%}, speculative "
            f"{row['translation_speculative_loop_share']:+.1%} ({row['translation_mean_num_draft']} drafts per step in "
            "the last)"
        )
    print(
        f"  tok/s: regular {row['regular_tok_s']:.1f} ({row['regular_vs_ctranslate2']:.2f}x CTranslate2), "
        f"speculative {row['speculative_tok_s']:.1f} ({row['speculative_vs_ctranslate2']:.2f}x), "
        f"CTranslate2 greedy {row['ctranslate2 greedy_tok_s']:.1f}; same tokens as CTranslate2: regular "
        f"{row['regular_same_tokens']}, speculative {row['speculative_same_tokens']}"
    )


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=["demo"],
        choices=["demo", "small-self"],
        help="Pairs to measure: the bundled demo pair, random t5-small as its own draft (default: demo)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="*",
        default=[],
        choices=sorted(DTYPES),
        help="Also time the steps of the pairs converted to these, native layers against MLX's operations",
    )
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per timed run (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per prompt, EOS ignored (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds of every method in turn (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_out"), help="Directory for step.json")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if min(args.prompts, args.max_tokens, args.repeats) < 1:
        print("error: --prompts, --max-tokens and --repeats must be at least 1", file=sys.stderr)
        sys.exit(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs:
            rows.append(measure_pair(name, Path(tmp), args.prompts, args.max_tokens, args.repeats))
            print_row(rows[-1])
            for dtype in args.dtypes:
                rows.append(dtype_steps(name, Path(tmp), dtype))
                print_dtype_row(rows[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults in {args.out / 'step.json'}")
    if not all(row.get("regular_same_tokens", True) and row.get("speculative_same_tokens", True) for row in rows):
        print("error: a method's tokens differ from CTranslate2's", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
