"""`--num-draft auto` against regular decoding and every fixed draft length, in one run.

Rounds over the prompts, each prompt decoded by every setting in turn (so that a slow spell of the machine falls on
all alike); every setting must produce the regular greedy tokens. auto runs twice per round: once with
an empty cache (its step costs measured first; the measuring is reported apart, not in its tokens per second) and once
with the costs and acceptance kept from the runs before. --draft random drafts with a model of the draft's shape and
random weights (never accepted); --draft self has the main model draft for itself (no length pays).

    python -m benchmarks.auto_draft                     # the demo pair on its held-out prompts
    python -m benchmarks.auto_draft --draft random --drafters model
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

import step_costs
from benchmarks import in_turn
from decoder import SpeculativeDecoder
from experiments.run import model_dir
from loader import load_model
from prompt_file import read_prompts

ROOT = Path(__file__).resolve().parent.parent


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model-name", default="demo-main", help="Main model (as experiments/run.py)")
    parser.add_argument("--draft-model-name", default="demo-draft", help="Draft model (as experiments/run.py)")
    parser.add_argument("--draft", choices=["trained", "random", "self"], default="trained", help="What drafts")
    parser.add_argument("--drafters", nargs="+", default=["model", "lookup"], help="Drafters to measure")
    parser.add_argument(
        "--prompts",
        type=Path,
        default=ROOT / "models" / "demo" / "prompts.txt",
        help='One per line, or JSON Lines with a "prompt" field',
    )
    parser.add_argument("--num-prompts", type=int, default=8, help="Use the first N prompts; 0: all")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per prompt (EOS ignored)")
    parser.add_argument("--fixed", type=int, nargs="+", default=[1, 2, 3, 4], help="Fixed draft lengths to compare")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds")
    return parser


def generate(decoder, prompt, max_tokens, regular=False):
    """(seconds of decoding, tokens, seconds spent measuring step costs) of one prompt."""
    generation = decoder.generate(prompt, max_tokens, regular=regular, ignore_eos=True)
    return generation.stats.seconds, generation.tokens, generation.stats.calibration_seconds


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    model, tokenizer, _ = load_model(model_dir(args.model_name, "main"))
    draft_model, _, _ = load_model(model_dir(args.draft_model_name, "draft"))
    if args.draft == "random":
        mx.random.seed(1)
        random = tree_map(lambda w: (mx.random.normal(w.shape) * mx.std(w)).astype(w.dtype), draft_model.parameters())
        draft_model.update(random)
    elif args.draft == "self":
        draft_model = model
    prompts = read_prompts(args.prompts)[: args.num_prompts or None]
    settings = [("regular", "model", 0)] + [(f"k={k}", "model", k) for k in args.fixed]
    settings = [s for s in settings if s[1] in args.drafters or s[0] == "regular"]
    for drafter in args.drafters:
        settings += [(f"{drafter} auto, empty cache", drafter, "auto"), (f"{drafter} auto, cached", drafter, "auto")]
    if "lookup" in args.drafters:
        settings.insert(1, ("lookup k=4", "lookup", 4))
    kept = tempfile.mkdtemp(prefix="auto-cache-")
    rates = {name: [] for name, _, _ in settings}
    fastest = [[float("inf")] * len(prompts) for _ in settings]  # per setting and prompt, its fastest round
    reference = [None] * len(prompts)
    # Warm-up, untimed: regular decoding, and auto filling the kept cache (its costs, and a first prompt's acceptance).
    os.environ[step_costs.ENV_VAR] = kept
    generate(SpeculativeDecoder(model, None, tokenizer), prompts[0], args.max_tokens, regular=True)
    for drafter in args.drafters:
        generate(SpeculativeDecoder(model, draft_model, tokenizer, num_draft="auto", drafter=drafter), prompts[0], 16)
    for round_number in range(args.rounds):
        # Each round: new decoders, an empty cache for the first auto of each drafter (the kept one, filled by the runs
        # before, for the others); every prompt decoded by every setting in turn, in the orders of in_turn (each
        # setting in every place, and after every other, equally often).
        empty = tempfile.mkdtemp(prefix="auto-empty-")
        decoders = [
            SpeculativeDecoder(
                model, draft_model, tokenizer, num_draft=num_draft or 1, drafter=drafter, max_num_draft=8
            )
            for _, drafter, num_draft in settings
        ]
        seconds, tokens, calibration = [0.0] * len(settings), [0] * len(settings), [0.0] * len(settings)
        for i, prompt in enumerate(prompts):
            for j in in_turn(list(range(len(settings))), i, round_number):
                name, _, num_draft = settings[j]
                os.environ[step_costs.ENV_VAR] = empty if "empty" in name else kept
                took, output, measuring = generate(decoders[j], prompt, args.max_tokens, regular=num_draft == 0)
                reference[i] = reference[i] or output
                if output != reference[i]:
                    print(f"error: {name} did not reproduce regular greedy decoding", file=sys.stderr)
                    sys.exit(1)
                seconds[j] += took
                fastest[j][i] = min(fastest[j][i], took)
                tokens[j] += len(output)
                calibration[j] += measuring
        for j, (name, _, _) in enumerate(settings):
            rates[name].append(tokens[j] / seconds[j])
            extra = f" (+{calibration[j]:.2f} s measuring step costs)" if calibration[j] else ""
            print(f"round {round_number + 1} {name:24s} {rates[name][-1]:7.1f} tokens/s{extra}", flush=True)
    print(f"\n{len(prompts)} prompts x {args.max_tokens} tokens, draft {args.draft}; tokens/s per round, and ratios")
    regular = rates["regular"]
    fixed = [name for name, _, k in settings if isinstance(k, int) and k and name.startswith("k=")]
    for name in rates:
        ratios = [rate / base for rate, base in zip(rates[name], regular)]
        line = (
            f"{name:24s} "
            + " ".join(f"{r:7.1f}" for r in rates[name])
            + "   vs regular "
            + " ".join(f"{r:.2f}x" for r in ratios)
        )
        if fixed and "model auto" in name:
            best = [max(rates[f][i] for f in fixed) for i in range(args.rounds)]
            line += "   vs best fixed " + " ".join(f"{r / b:.2f}x" for r, b in zip(rates[name], best))
        print(line)
    print(f"median regular: {statistics.median(regular):.1f} tokens/s")
    # Each prompt's fastest round, summed: what a slow spell did not touch.
    total = len(prompts) * args.max_tokens
    best = {name: total / sum(fastest[j]) for j, (name, _, _) in enumerate(settings)}
    line = ", ".join(f"{name} {rate / best['regular']:.2f}x" for name, rate in best.items() if name != "regular")
    print(f"fastest round of each prompt, against regular decoding's: {line}")


if __name__ == "__main__":
    main()
