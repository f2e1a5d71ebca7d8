"""The price in quality of int8 activations for quantized weights, on the bundled demo pair's main model and its
held-out prompts (models/demo/prompts.txt).

The main model is converted to float32 and to 8- and 4-bit. Over each prompt, the float32 model's greedy tokens are
fed to every model (teacher forcing) and the next-token distributions compared: for each bit width, the mean KL of
the quantized model against the float32 model (both with float activations), and the mean KL of the quantized model
with int8 activations against the same model with float activations. The integer path passes where the second is at
most a tenth of the first. Greedy agreement alongside: the share of teacher-forced positions where the two argmaxes
agree, and the share of prompts whose greedy outputs (--max-tokens) are identical. The 4-bit model's scales and
biases are bfloat16 (convert.py's default for 4-bit weights); the same weights with float32 ones are compared too, to
show what the smaller scales cost.

    python -m benchmarks.int8_activations [--max-tokens 64] [--json out.json]
"""

import blas  # noqa: F401  (before mlx)

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

import convert
import kernels
from decoder import SpeculativeDecoder
from loader import load_model
from prompt_file import read_prompts

ROOT = Path(__file__).resolve().parent.parent

DEMO_DIR = ROOT / "models" / "demo"
# The criterion: int8 activations may cost at most this share of what quantizing the weights costs.
MAX_SHARE = 0.1


def log_probs(model, input_ids, targets, integer=False):
    """(T, vocab) log-probabilities of the next token at each teacher-forced position."""
    kernels.integer = integer  # read when the products are built (and when a model's graphs are compiled)
    cross_kv = model.cross_kv(model.encode(mx.array([input_ids])))
    start = model.args.decoder_start_token_id
    logits = model.decode(mx.array([[start] + targets[:-1]]), cross_kv, model.make_cache())[0]
    return logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)


def kl(p_log, q_log):
    """Mean over positions of KL(p || q)."""
    return mx.mean(mx.sum(mx.exp(p_log) * (p_log - q_log), axis=-1)).item()


def greedy(model, tokenizer, prompt, max_tokens, integer):
    kernels.integer = integer
    return list(SpeculativeDecoder(model, None, tokenizer).generate(prompt, max_tokens=max_tokens, regular=True).tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="Greedy tokens per prompt")
    parser.add_argument("--group-size", type=int, default=64, help="Quantization group size (convert.py -q)")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file")
    args = parser.parse_args()
    if kernels.native is None or not kernels.native.integer_products():
        print(
            f"error: no integer products here ({kernels.active}); build the kernels on a CPU with AVX-512 VNNI "
            "or run with T5_KERNEL_ISA=portable",
            file=sys.stderr,
        )
        sys.exit(2)
    prompts = read_prompts(DEMO_DIR / "prompts.txt")
    print(f"kernels: {kernels.active}; {len(prompts)} prompts, {args.max_tokens} tokens each")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        f32_path = convert.convert(str(DEMO_DIR / "main"), mlx_path=f"{out}/float32")
        reference, tokenizer, _ = load_model(f32_path)
        decoder = SpeculativeDecoder(reference, None, tokenizer)
        runs = [decoder.generate(p, max_tokens=args.max_tokens, regular=True) for p in prompts]
        inputs = [tokenizer(p).input_ids for p in prompts]
        targets = [list(g.tokens) for g in runs]
        f32_log = [log_probs(reference, i, t) for i, t in zip(inputs, targets)]
        mx.eval(f32_log)
        del reference

        def quantized(name, bits, scales_dtype="auto"):
            return convert.convert(
                str(DEMO_DIR / "main"),
                mlx_path=f"{out}/{name}",
                quantize=True,
                q_bits=bits,
                q_group_size=args.group_size,
                q_scales_dtype=scales_dtype,
            )

        for bits in (8, 4):
            path = quantized(f"q{bits}", bits)
            # A model per setting: the activations are fixed in a model's compiled graphs when first traced.
            models = {integer: load_model(path)[0] for integer in (False, True)}
            float_log = [log_probs(models[False], i, t, False) for i, t in zip(inputs, targets)]
            int_log = [log_probs(models[True], i, t, True) for i, t in zip(inputs, targets)]
            weights_kl = sum(kl(a, b) for a, b in zip(f32_log, float_log)) / len(prompts)
            wide = load_model(quantized(f"q{bits}-float32-scales", bits, "float32"))[0]
            wide_kl = sum(kl(a, log_probs(wide, i, t)) for a, i, t in zip(f32_log, inputs, targets)) / len(prompts)
            del wide
            activations_kl = sum(kl(a, b) for a, b in zip(float_log, int_log)) / len(prompts)
            agree = [mx.mean(mx.argmax(a, -1) == mx.argmax(b, -1)).item() for a, b in zip(float_log, int_log)]
            outputs = {i: [greedy(models[i], tokenizer, p, args.max_tokens, i) for p in prompts] for i in (False, True)}
            same = sum(a == b for a, b in zip(outputs[False], outputs[True])) / len(prompts)
            results[f"{bits}-bit"] = dict(
                kl_weights_vs_float32=weights_kl,
                kl_weights_vs_float32_with_float32_scales=wide_kl,
                kl_int8_vs_float_activations=activations_kl,
                share=activations_kl / weights_kl if weights_kl else float("inf"),
                passes=activations_kl <= MAX_SHARE * weights_kl,
                argmax_agreement=sum(agree) / len(agree),
                identical_greedy_outputs=same,
            )
            r = results[f"{bits}-bit"]
            print(
                f"{bits}-bit (groups of {args.group_size}): KL {bits}-bit vs float32 {weights_kl:.2e} (with float32 "
                f"scales and biases {wide_kl:.2e}); "
                f"KL int8 vs float activations {activations_kl:.2e} ({r['share']:.3f} of it: "
                f"{'passes' if r['passes'] else 'FAILS'} <= {MAX_SHARE}); teacher-forced argmax agreement "
                f"{r['argmax_agreement']:.1%}; identical greedy outputs {same:.0%} of prompts",
                flush=True,
            )
            del models
    if args.json:
        Path(args.json).write_text(json.dumps(dict(kernels=kernels.active, results=results), indent=2))


if __name__ == "__main__":
    main()
