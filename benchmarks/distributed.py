"""Tensor parallelism measured: main.py on 1 process and on 2 ranks over loopback, and per-rank memory from the plan.

    python -m benchmarks.distributed run --work /tmp/tp      # a random t5-large-shaped float32 model
    python -m benchmarks.distributed plan --shape t5-11b     # per-rank weight memory for 1, 2, 4, 8 ranks

`run` starts the ranks as `mlx.launch -n 2 --backend ring` does on one machine (MLX_HOSTFILE, MLX_RANK), so that it can
read each rank's peak resident memory when it exits. One process and two ranks alternate round by round. This process
imports nothing large (a child's peak counts its parent's memory at the fork), and builds the model in a child.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.shapes import SHAPES, VOCAB_SIZE  # (a table: nothing large)

ROOT = Path(__file__).resolve().parent.parent

# (conversion dtype, quantization) as convert.py writes them; float16 keeps wo in float32 and unquantized.
LAYOUTS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "bfloat16 8-bit": ("bfloat16", {"group_size": 64, "bits": 8}),
    "bfloat16 4-bit": ("bfloat16", {"group_size": 64, "bits": 4}),
}
PROMPT = "translate English to German: The house is wonderful and the garden is large."


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args, ranks=2, timeout=120, env=None):
    """Run `python args...` as `ranks` ring-backend ranks over loopback (one process, without the distributed
    environment, for ranks=1); every rank still running is killed at the first failure or at the timeout.
    -> [(exit code, stdout, stderr, peak resident bytes)] per rank."""
    env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
        processes, outputs = [], []
        for rank in range(ranks):
            outputs.append((open(Path(tmp) / f"{rank}.out", "w+"), open(Path(tmp) / f"{rank}.err", "w+")))
            distributed = {"MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)} if ranks > 1 else {}
            processes.append(
                subprocess.Popen(
                    [sys.executable, *map(str, args)],
                    cwd=ROOT,
                    env={**env, **distributed},
                    stdout=outputs[-1][0],
                    stderr=outputs[-1][1],
                )
            )
        ended = {}  # rank -> (exit code, peak resident bytes), from wait4 as each exits

        def reap(rank, flags):
            pid, status, usage = os.wait4(processes[rank].pid, flags)
            if pid:
                processes[rank].returncode = os.waitstatus_to_exitcode(status)
                ended[rank] = (processes[rank].returncode, usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux

        deadline = time.monotonic() + timeout
        try:
            # A rank that fails leaves the others waiting for it: stop at the first failure.
            while len(ended) < ranks and time.monotonic() < deadline and all(code == 0 for code, _ in ended.values()):
                for rank in set(range(ranks)) - set(ended):
                    reap(rank, os.WNOHANG)
                time.sleep(0.05)
        finally:
            for rank in set(range(ranks)) - set(ended):
                processes[rank].kill()
                reap(rank, 0)
        results = []
        for rank, (stdout, stderr) in enumerate(outputs):
            stdout.seek(0), stderr.seek(0)
            results.append((ended[rank][0], stdout.read(), stderr.read(), ended[rank][1]))
            stdout.close(), stderr.close()
        return results


class PlanGroup:
    """Stands in for an mx.distributed group of `ranks` when only the shapes of a shard are wanted."""

    def __init__(self, ranks):
        self.ranks = ranks

    def size(self):
        return self.ranks

    def rank(self):
        return 0


def rank_bytes(args, dtype: str, quantization, ranks: int) -> int:
    """Weight bytes one of `ranks` ranks holds: convert.py's plan of each tensor (dtype, quantized or not), sharded as
    T5.shard splits it (nothing is allocated: the arrays stay lazy)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from convert import DTYPES, plan_tensor
    from model import T5

    full = T5(args)
    dtypes = {}
    for name, array in tree_flatten(full.parameters()):
        for output, output_dtype, _ in plan_tensor(name, name, array.shape, DTYPES[dtype], quantization).outputs:
            dtypes[output] = output_dtype
    model = T5(args)
    if quantization:
        nn.quantize(model, **quantization, class_predicate=lambda name, module: f"{name}.scales" in dtypes)
    if ranks > 1:
        model.shard(PlanGroup(ranks))
    return sum(array.size * dtypes[name].size for name, array in tree_flatten(model.parameters()))


def all_sums_per_step(args, tokens: int = 1, itemsize: int = 4):
    """(all_sum calls, bytes each rank contributes) for one decoder pass over `tokens` new tokens: the self-attention,
    cross-attention and feed-forward outputs of every decoder layer, (tokens, d_model) each."""
    calls = 3 * args.num_decoder_layers
    return calls, calls * tokens * args.d_model * itemsize


def plan(shape):
    from model import ModelArgs

    args = ModelArgs.from_dict({"vocab_size": VOCAB_SIZE, "feed_forward_proj": "relu", **SHAPES[shape]})
    counts = [1, 2, 4, 8]
    print(f"{shape}: weight memory per rank (GB = 1e9 bytes)\n")
    print("| layout | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}" for n in counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for name, (dtype, quantization) in LAYOUTS.items():
        sizes = [rank_bytes(args, dtype, quantization, n) / 1e9 for n in counts]
        print(f"| {name} | " + " | ".join(f"{size:.2f}" for size in sizes) + " |")
    calls, nbytes = all_sums_per_step(args)
    print(f"\nall_sum per decoded token (regular decoding, float32): {calls} calls, {nbytes / 1024:.0f} KiB per rank")


def build_model(work: Path):
    """A random t5-large-shaped checkpoint (transformers), converted to float32 into work/t5-large-mlx."""
    import convert
    from tools.random_checkpoint import reuse_or_write

    source = reuse_or_write("t5-large", work / "t5-large-hf", seed=0)
    convert.convert(str(source), mlx_path=str(work / "t5-large-mlx"))


def run(work: Path, rounds: int, max_tokens: int):
    model_dir = work / "t5-large-mlx"
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.distributed", "build", "--work", work], cwd=ROOT, check=True)
    flags = ["--model-name", model_dir, "--prompt", PROMPT, "-m", max_tokens, "--ignore-eos", "--regular-decode"]
    rows = []
    for round_ in range(rounds):
        for ranks in (1, 2):
            results = launch(["main.py", *flags, "--json"], ranks=ranks, timeout=900, env={"HF_HUB_OFFLINE": "1"})
            for rank, (code, stdout, stderr, rss) in enumerate(results):
                if code != 0:
                    sys.exit(f"{ranks} rank(s), rank {rank} exited with {code}:\n{stderr}")
            result = json.loads(results[0][1])
            peak = max(rss for *_, rss in results)
            rows.append((round_, ranks, result["stats"]["tokens_per_second"], peak, result["tokens"]))
            print(
                f"round {round_}: {ranks} rank(s): {rows[-1][2]:.2f} tokens/s, peak RSS per rank {peak / 2**30:.2f} GiB"
            )
    for round_ in range(rounds):
        (_, _, speed_1, rss_1, tokens_1), (_, _, speed_2, rss_2, tokens_2) = rows[2 * round_ : 2 * round_ + 2]
        print(
            f"round {round_}: 2 ranks / 1 process: peak RSS {rss_2 / rss_1:.0%}, tokens/s {speed_2 / speed_1:.2f}x, "
            f"same tokens: {tokens_1 == tokens_2}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="1 process against 2 ranks on a t5-large-shaped float32 model")
    run_parser.add_argument("--work", type=Path, required=True, help="Directory for the model (reused if there)")
    run_parser.add_argument("--rounds", type=int, default=2, help="Rounds of (1 process, 2 ranks)")
    run_parser.add_argument("--max-tokens", type=int, default=32, help="Tokens decoded per run (EOS ignored)")
    plan_parser = commands.add_parser("plan", help="Per-rank weight memory from the shard plan")
    plan_parser.add_argument("--shape", choices=["t5-large", "t5-11b"], default="t5-11b", help="Model shape")
    build_parser = commands.add_parser("build", help="Only write the random t5-large-shaped model into --work")
    build_parser.add_argument("--work", type=Path, required=True, help="Directory for the model")
    args = parser.parse_args()
    if args.command == "plan":
        plan(args.shape)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        run(args.work, args.rounds, args.max_tokens)
    else:
        build_model(args.work)


if __name__ == "__main__":
    main()
