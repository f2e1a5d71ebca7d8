"""Measure the bundled demo pair on its held-out sentences: translation quality, draft cost, acceptance, speedup.

    python -m benchmarks.demo_pair                       # the draft model at 1..6 drafts per step and auto
    python -m benchmarks.demo_pair --drafter lookup hybrid --num-draft 2 4 auto
    python -m benchmarks.demo_pair --temperature 1       # sampled: exact match, regular against speculative

Quality first: the exact match and BLEU of the main and the draft model's greedy translations against the
references. Then speed, greedy at delta = 0, so every speculative run must reproduce the regular run token for token
(checked). Each setting is timed in turn with regular decoding alone, prompt by prompt (never among the other
settings: regular decoding ran 1.1-1.2x slower with seven speculative settings between its prompts than with one, and
the speculative ones faster, which overstated every speedup), and its speedup is over that regular decoding. Each
prompt is decoded `--repeats` times per setting and the fastest time is kept: another process on the machine slows
some runs, never speeds one up. Where ctranslate2 is installed, its greedy decoding of the main model (to the EOS, in
a process of its own) is timed too, a block of all prompts after each round of the others, its tokens compared with
regular decoding's.
"""

import blas  # (before mlx)

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

import convert
from benchmarks import in_turn
from decoder import DRAFTERS, SpeculativeDecoder
from loader import load_model

ROOT = Path(__file__).resolve().parent.parent

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


def drafting_seconds_per_token(model, tokenizer, prompt, count=4, rounds=16):
    """One token of greedy drafting as the drafter runs it: `count` tokens in one `greedy_draft` call (its native
    operation, computed at once), the cache rewound after each; None where the native layers do not apply."""
    cross_kv = model.cross_kv(model.encode(mx.array([tokenizer(prompt).input_ids])))
    cache = model.make_cache()
    mx.eval(model.decode(mx.array([[model.args.decoder_start_token_id] * 8]), cross_kv, cache))
    first = mx.array([[3]])
    start = time.perf_counter()
    for _ in range(rounds):
        tokens = model.greedy_draft(first, cross_kv, cache, count, now=True)
        if tokens is None:
            return None
        mx.eval(tokens)
        for layer_cache in cache:
            layer_cache.trim(count)
    return (time.perf_counter() - start) / (rounds * count)


# Seconds between CTranslate2's block of prompts and this project's: its OpenMP threads spin on after a call.
PEER_PAUSE = 0.3


class CTranslate2Peer:
    """CTranslate2's greedy decoding of the demo main model (its own process, benchmarks.decode_step), to its EOS."""

    def __init__(self, tokenizer, work):
        from benchmarks.decode_step import CTranslate2Greedy

        self.greedy = CTranslate2Greedy(DEMO_DIR / "main", Path(work), tokenizer)

    def timed(self, prompt, max_tokens):
        """(token ids, seconds), the request to its process and back included."""
        start = time.perf_counter()
        tokens = self.greedy.generate(prompt, max_tokens, until_eos=True)
        return tokens, time.perf_counter() - start


def ctranslate2_peer(tokenizer, work):
    """A CTranslate2Peer, or None without ctranslate2 (requirements-experiments.txt)."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return None
    return CTranslate2Peer(tokenizer, work)


def fastest_runs(decoders, prompts, repeats, first_round=0, **options):
    """name -> per prompt, the fastest of `repeats` generations. Each prompt is decoded by every decoder in turn, in
    the orders of benchmarks.in_turn (each decoder in every place, and after every other, equally often)."""
    names = list(decoders)
    runs = {name: [[] for _ in prompts] for name in names}
    for round_ in range(first_round, first_round + repeats):
        for i, prompt in enumerate(prompts):
            for name in in_turn(names, i, round_):
                decoder, regular = decoders[name]
                runs[name][i].append(decoder.generate(prompt, regular=regular, **options))
    return {name: [min(tries, key=lambda g: g.stats.seconds) for tries in r] for name, r in runs.items()}


def quality(decoder, examples, regular=True, **options):
    """(exact match, BLEU or None without sacrebleu) of `decoder`'s outputs against the references."""
    outputs = [decoder.generate(e["prompt"], regular=regular, **options).text for e in examples]
    references = [e["reference"] for e in examples]
    exact = sum(o == r for o, r in zip(outputs, references)) / len(examples)
    try:
        import sacrebleu
    except ImportError:
        return exact, None
    return exact, sacrebleu.corpus_bleu(outputs, [references]).score


def sampled_quality(main_model, draft_model, tokenizer, examples, temperature, seeds):
    """Exact match of sampled translations, regular against speculative (delta 0), each over `seeds`."""
    for name, regular in (("regular", True), ("speculative", False)):
        rates = []
        for seed in seeds:
            decoder = SpeculativeDecoder(main_model, draft_model, tokenizer, temperature=temperature, seed=seed)
            rates.append(quality(decoder, examples, regular=regular)[0])
        spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
        print(f"{name:11s} sampling at temperature {temperature}: exact match {statistics.mean(rates):.1%} "
              f"(± {spread:.1%} over {len(seeds)} seeds)")  # fmt: skip


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
        "--prompts",
        type=Path,
        default=DEMO_DIR / "prompts.txt",
        help='JSON Lines of {"prompt", "reference"}: held-out sentences',
    )
    parser.add_argument("--num-prompts", type=int, default=50, help="How many of the file's prompts to use")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="Above 0: measure sampled exact match instead of speed"
    )
    parser.add_argument("--seeds", type=int, default=5, help="With --temperature: seeds per decoding method")
    args = parser.parse_args()

    try:
        main_model, draft_model, tokenizer = load_demo()
    except convert.ConversionError as e:  # a damaged models/demo; a fresh conversion always loads
        print("error: " + " ".join(str(e).split()) + f"; restore {DEMO_DIR} with git checkout", file=sys.stderr)
        sys.exit(2)
    print(f"BLAS: {blas.active}")
    examples = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    examples = examples[: args.num_prompts]
    prompts = [e["prompt"] for e in examples]
    if args.temperature > 0:
        sampled_quality(main_model, draft_model, tokenizer, examples, args.temperature, range(args.seeds))
        return
    for name, model in (("main", main_model), ("draft", draft_model)):
        exact, bleu = quality(SpeculativeDecoder(model, None, tokenizer), examples)
        print(f"{name:5s}: exact match {exact:.1%}, BLEU {'-' if bleu is None else f'{bleu:.1f}'} "
              f"over {len(examples)} held-out sentences")  # fmt: skip
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
    drafting = [
        [drafting_seconds_per_token(draft_model, tokenizer, prompt) for prompt in prompts] for _ in range(args.repeats)
    ]
    if None not in drafting[0]:
        drafting = min(sum(times) / len(times) for times in drafting)
        print(
            f"draft, greedy drafting 4 tokens in one operation: {drafting * 1e3:.2f} ms per token, "
            f"{drafting / per_token['main']:.3f} of a main step"
        )

    regular_decoder = (SpeculativeDecoder(main_model, None, tokenizer), True)
    settings = {}
    for drafter in args.drafter:
        for num_draft in args.num_draft:
            decoder = SpeculativeDecoder(main_model, draft_model, tokenizer, num_draft=num_draft, drafter=drafter)
            settings[(drafter, num_draft)] = (decoder, False)
    with tempfile.TemporaryDirectory() as work:
        # CTranslate2 takes its turn a round at a time, all prompts in a block: its process's 25 MB of float32
        # weights push the main model's out of the shared L3 cache, which a turn per prompt would make the next
        # method's first steps pay (regular decoding ran 30% slower that way).
        peer = ctranslate2_peer(tokenizer, work)
        # per setting, the fastest (regular, speculative) generation of each prompt, timed in turn
        runs, peer_runs = {}, [(None, float("inf"))] * len(prompts)  # per prompt, the fastest (tokens, seconds)
        for round_ in range(args.repeats):
            for name, setting in settings.items():
                pair = {"regular": regular_decoder, "speculative": setting}
                fastest = fastest_runs(pair, prompts, 1, round_, max_tokens=args.max_tokens)
                earlier = runs.get(name, fastest)
                runs[name] = {
                    kind: [min(two, key=lambda g: g.stats.seconds) for two in zip(earlier[kind], fastest[kind])]
                    for kind in pair
                }
            if peer is not None:
                time.sleep(PEER_PAUSE)
                for i, prompt in enumerate(prompts):
                    peer_runs[i] = min(peer_runs[i], peer.timed(prompt, args.max_tokens), key=lambda run: run[1])
                time.sleep(PEER_PAUSE)
        if peer is not None:
            peer.greedy.close()
    # Regular decoding as many tries as every other method had: the median of its speeds over the settings' turns.
    regular = next(iter(runs.values()))["regular"]
    tokens = sum(g.stats.generated for g in regular)
    regular_speed = statistics.median(tokens / sum(g.stats.seconds for g in r["regular"]) for r in runs.values())
    print(
        f"\n{len(prompts)} prompts, {tokens} tokens; regular decoding {regular_speed:.1f} tokens/s "
        "(the median over the settings' turns; each speedup below is over its own turns with that setting)"
    )
    peer_speed = None
    if peer is not None:
        same = [ids for ids, _ in peer_runs] == [g.tokens for g in regular]
        peer_speed = tokens / sum(seconds for _, seconds in peer_runs)
        print(f"CTranslate2 greedy {peer_speed:.1f} tokens/s (its own process, a block a round), "
              f"the same tokens: {same}; regular decoding {regular_speed / peer_speed:.2f}x it")  # fmt: skip
    print("drafter  num_draft  acceptance  tokens/call  drafts/call  lookup calls  tokens/s  speedup  vs CTranslate2")
    for (drafter, num_draft), pair in runs.items():
        speculative = pair["speculative"]
        assert [g.tokens for g in speculative] == [g.tokens for g in regular], "speculative greedy != regular greedy"

        def total(name):
            return sum(getattr(g.stats, name) for g in speculative)

        calls, drafted = total("main_calls"), total("drafted")
        speed = tokens / sum(g.stats.seconds for g in speculative)
        beside = tokens / sum(g.stats.seconds for g in pair["regular"])  # regular decoding in this setting's turns
        rate = total("accepted") / drafted if drafted else 0.0
        # lookup calls: the share of main-model calls that verified a lookup match.
        print(
            f"{drafter:7s}  {num_draft:>9}  {rate:10.3f}  {tokens / calls:11.2f}  {drafted / calls:11.2f}  "
            f"{total('lookup_steps') / calls:12.1%}  {speed:8.1f}  {speed / beside:7.2f}  "
            f"{'-' if peer_speed is None else f'{speed / peer_speed:14.2f}'}"
        )


if __name__ == "__main__":
    main()
