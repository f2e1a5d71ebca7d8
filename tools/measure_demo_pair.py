"""Measure the bundled demo pair on its 20 held-out prompts: draft cost, acceptance rate and speedup.

    python tools/measure_demo_pair.py                       # the draft model at 1..6 drafts per step and auto
    python tools/measure_demo_pair.py --drafter lookup hybrid --num-draft 2 4 auto
    python tools/measure_demo_pair.py --prompts sweep       # experiments.py's 14 other held-out snippets

Greedy decoding at delta = 0, so every speculative run must reproduce the regular run token for token
(checked). Each prompt is decoded `--repeats` times per setting and the fastest time is kept: another process
on the machine slows some runs, never speeds one up.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import backend  # noqa: E402  (before mlx)

import mlx.core as mx  # noqa: E402

import convert  # noqa: E402
from decoder import DRAFTERS, SpeculativeDecoder  # noqa: E402
from experiment_prompts import DEFAULT_PROMPTS  # noqa: E402
from loader import load_model  # noqa: E402

DEMO_DIR = ROOT / "models" / "demo"


def load_demo():
    """(main, draft, tokenizer): models/demo as it is now, converted by convert.py (float32)."""
    with tempfile.TemporaryDirectory() as out:
        paths = [convert.convert(str(DEMO_DIR / role), mlx_path=f"{out}/{role}") for role in ("main", "draft")]
        (main, tokenizer, _), (draft, _, _) = [load_model(path) for path in paths]
    return main, draft, tokenizer


def seconds_per_token(model, tokenizer, prompt, steps=64):
    """One greedy decoder step (one token in, its logits and argmax out), waited for: as the draft runs."""
    cross_kv = model.cross_kv(model.encode(mx.array([tokenizer(prompt).input_ids])))
    cache = model.make_cache()
    token = model.args.decoder_start_token_id
    start = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(model.decode(mx.array([[token]]), cross_kv, cache)[0, -1]).item()
    return (time.perf_counter() - start) / steps


def fastest_runs(decoders, prompts, repeats, **options):
    """name -> per prompt, the fastest of `repeats` generations. The decoders take turns round by round, so that a
    slow spell of the machine falls on all of them alike."""
    runs = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, (decoder, regular) in decoders.items():
            runs[name].append([decoder.generate(prompt, regular=regular, **options) for prompt in prompts])
    return {name: [min(tries, key=lambda g: g.stats.seconds) for tries in zip(*r)] for name, r in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--num-draft",
        type=lambda text: text if text == "auto" else int(text),
        nargs="+",
        default=[1, 2, 3, 4, 5, 6, "auto"],
    )
    parser.add_argument("--drafter", choices=DRAFTERS, nargs="+", default=["model"])
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prompts", choices=["held-out", "sweep"], default="held-out", help="models/demo/prompts.txt or experiments.py's"
    )
    args = parser.parse_args()

    try:
        main_model, draft_model, tokenizer = load_demo()
    except convert.ConversionError as e:  # a damaged models/demo; a fresh conversion always loads
        print("error: " + " ".join(str(e).split()) + f"; restore {DEMO_DIR} with git checkout", file=sys.stderr)
        sys.exit(2)
    print(f"BLAS: {backend.active}")
    prompts = (DEMO_DIR / "prompts.txt").read_text().splitlines() if args.prompts == "held-out" else DEFAULT_PROMPTS
    options = dict(max_tokens=args.max_tokens, regular=True)
    # Warm up both models once, so that no measurement pays for first-call allocations.
    for model in (main_model, draft_model):
        SpeculativeDecoder(model, None, tokenizer).generate(prompts[0], **options)

    per_token = {}
    for name, model in (("main", main_model), ("draft", draft_model)):
        per_token[name] = min(
            sum(seconds_per_token(model, tokenizer, prompt) for prompt in prompts) / len(prompts)
            for _ in range(args.repeats)
        )
        print(f"{name:5s}: {per_token[name] * 1e3:.2f} ms per token")
    print(f"draft / main cost per token: {per_token['draft'] / per_token['main']:.3f}")

    decoders = {("regular", 0): (SpeculativeDecoder(main_model, None, tokenizer), True)}
    for drafter in args.drafter:
        for num_draft in args.num_draft:
            decoder = SpeculativeDecoder(main_model, draft_model, tokenizer, num_draft=num_draft, drafter=drafter)
            decoders[(drafter, num_draft)] = (decoder, False)
    runs = fastest_runs(decoders, prompts, args.repeats, max_tokens=args.max_tokens)
    regular = runs.pop(("regular", 0))
    tokens = sum(g.stats.generated for g in regular)
    regular_speed = tokens / sum(g.stats.seconds for g in regular)
    print(f"\n{len(prompts)} prompts, {tokens} tokens; regular decoding {regular_speed:.1f} tokens/s")
    print("drafter  num_draft  acceptance  tokens/call  drafts/call  lookup calls  tokens/s  speedup")
    for (drafter, num_draft), speculative in runs.items():
        assert [g.tokens for g in speculative] == [g.tokens for g in regular], "speculative greedy != regular greedy"

        def total(name):
            return sum(getattr(g.stats, name) for g in speculative)

        calls, drafted = total("main_calls"), total("drafted")
        speed = tokens / sum(g.stats.seconds for g in speculative)
        rate = total("accepted") / drafted if drafted else 0.0
        # lookup calls: the share of main-model calls that verified a lookup match.
        print(
            f"{drafter:7s}  {num_draft:>9}  {rate:10.3f}  {tokens / calls:11.2f}  {drafted / calls:11.2f}  "
            f"{total('lookup_steps') / calls:12.1%}  {speed:8.1f}  {speed / regular_speed:7.2f}"
        )


if __name__ == "__main__":
    main()
