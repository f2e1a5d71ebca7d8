"""Tensor parallelism over two ranks on this machine's loopback, against one process."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT
from distributed_worker import MAX_TOKENS, PROMPT, outputs

import convert
from loader import load_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TIMEOUT = 120  # seconds for both ranks together


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args, tmp_path, ranks=2):
    """Run `python args...` as `ranks` ring-backend ranks over loopback, as mlx.launch does; both are ended on a
    failure or a timeout. -> [(returncode, stdout, stderr)] per rank."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
    processes = [
        subprocess.Popen(
            [sys.executable, *map(str, args)],
            cwd=ROOT,
            env={**ENV, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ranks)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        # A rank that fails leaves the others waiting for it: stop at the first failure.
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    results = [(p.wait(), *p.communicate()) for p in processes]
    assert all(returncode == 0 for returncode, _, _ in results), "\n".join(
        f"rank {rank} exited with {returncode}:\n{stderr}" for rank, (returncode, _, stderr) in enumerate(results)
    )
    return results


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_checkpoint, converted):
    """(main, draft) directory pairs: float32 relu tied, float32 gated untied, and quantized gated."""
    # Quantized layers need each rank's input columns in whole groups: 64 inner dims = 2 ranks x 32.
    quantized = tmp_path_factory.mktemp("mlx") / "quantized"
    source = hf_checkpoint("t5-v1_1", d_model=64, d_kv=16, d_ff=128)
    convert.convert(str(source), mlx_path=str(quantized), quantize=True, q_group_size=32)
    return [
        (converted("t5"), converted("t5", seed=1)),
        (converted("t5-v1_1"), converted("t5-v1_1", seed=1)),
        (quantized, converted("t5-v1_1", seed=1)),
    ]


def test_two_ranks_match_one_process(models, tmp_path):
    launch(["tests/distributed_worker.py", tmp_path, *(str(path) for pair in models for path in pair)], tmp_path)
    for i, (main_dir, draft_dir) in enumerate(models):
        model, tokenizer, _ = load_model(main_dir)
        expected = outputs(model, tokenizer, *load_model(draft_dir)[:2])
        sharded = np.load(tmp_path / f"{i}.npz")
        assert (sharded["ranks"], sharded["heads"]) == (2, model.args.num_heads // 2)
        np.testing.assert_allclose(sharded["logits"], expected["logits"], atol=1e-4, rtol=0)
        assert sharded["regular"].tolist() == expected["regular"].tolist()
        assert sharded["speculative"].tolist() == expected["speculative"].tolist()


def test_main_under_two_ranks_prints_once_the_tokens_of_one_process(models, tmp_path):
    main_dir, draft_dir = models[1]
    flags = ["--prompt", PROMPT, "-m", MAX_TOKENS, "--num-draft", 3, "--ignore-eos", "--json"]
    results = launch(["main.py", "--model-name", main_dir, "--draft-model-name", draft_dir, *flags], tmp_path)
    (_, stdout, _), (_, rank1_stdout, rank1_stderr) = results
    assert (rank1_stdout, rank1_stderr) == ("", "")
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    expected = outputs(*load_model(main_dir)[:2], *load_model(draft_dir)[:2])
    assert json.loads(lines[0])["tokens"] == expected["speculative"].tolist()
