"""The native kernels' instruction-set paths side by side: GB/s of decode-shaped products per dtype and rows, and the
cost of k rows over one, for every path this CPU runs (and, for quantized weights, float and int8 activations),
interleaved round by round so that a busy machine weighs on all alike. Each path multiplies the weights as a model
holds them on it (the packed copies where the kernels make them: matmul.as_models_hold).

    python -m benchmarks.kernel_paths [--rows 1 5 8 16 512] [--rounds 3]
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import json
import os

import mlx.core as mx

import kernels
from benchmarks.matmul import DTYPES, as_models_hold, feed_forward_stack, product, seconds, stack_inputs


def settings():
    """(label, isa, integer) for every path: quantized weights also with int8 activations where a path has them."""
    out = []
    for isa in kernels.native.isas():
        kernels.native.set_isa(isa)
        out.append((isa, isa, False))
        if kernels.native.integer_products():
            out.append((f"{isa} int8", isa, True))
    return out


def sweep(rows_list, rounds, repeats):
    results = {}
    for name, bits, dtype in DTYPES:
        matrices, nbytes = feed_forward_stack(bits, dtype)
        held = {}  # per path, the matrices as a model holds them there
        for label, isa, integer in settings():
            kernels.native.set_isa(isa)
            kernels.integer = integer
            held[label] = [as_models_hold(a, bits) for a in matrices]
        for rows in rows_list:
            inputs = stack_inputs(matrices, bits, rows)
            if name == "bfloat16":
                inputs = [x.astype(mx.bfloat16) for x in inputs]  # a bfloat16 model's activations
            mx.eval(inputs)
            for _ in range(rounds):
                for label, isa, integer in settings():
                    if integer and not bits:
                        continue
                    kernels.native.set_isa(isa)
                    kernels.integer = integer
                    run = lambda: mx.eval(  # noqa: E731
                        [product(x, a, bits, True) for x, a in zip(inputs, held[label])]
                    )
                    s = seconds(run, repeats)
                    key = (name, rows, label)
                    results[key] = min(results.get(key, s), s)
            for label, _, integer in settings():
                if (name, rows, label) in results:
                    print(
                        f"{name:<9}{rows:>5} {label:<12}{nbytes / results[(name, rows, label)] / 1e9:>8.1f} GB/s"
                        f"{results[(name, rows, label)] / results.get((name, 1, label), float('nan')):>7.2f}x",
                        flush=True,
                    )
    return {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 5, 8, 16], help="Rows per product")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds over every path (the best round counts)")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per round (the median counts)")
    parser.add_argument("--out", default=None, help="Write the seconds per (dtype, rows, path) as JSON here")
    args = parser.parse_args()
    print(f"kernels: {kernels.active}; load: {os.getloadavg()}")
    results = sweep(args.rows, args.rounds, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
