"""Tensor parallelism over two ranks on this machine's loopback, against one process."""

import json

import mlx.core as mx
import numpy as np
import pytest
from distributed_worker import MAX_TOKENS, PROMPT, outputs

import convert
import kernels
from benchmarks.distributed import PlanGroup, launch
from loader import ModelLoadError, load_model, read_rank_slices

# Float activations for quantized products on both sides: int8 ones (4-bit's default) turn the last bits of x, which
# the ranks' partial sums leave in another order than one process, into whole steps of a group's int8 grid.
ENV = {"HF_HUB_OFFLINE": "1", "T5_KERNELS": "exact"}


def run_ranks(*args):
    """Run `python args...` as 2 ranks over loopback (ended at the first failure or after 2 minutes); all succeed."""
    results = launch(args, ranks=2, timeout=120, env=ENV)
    assert all(code == 0 for code, *_ in results), "\n".join(
        f"rank {rank} exited with {code}:\n{stderr}" for rank, (code, _, stderr, _) in enumerate(results)
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


def test_two_ranks_match_one_process(models, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "integer", False)  # as ENV's T5_KERNELS=exact sets the ranks
    run_ranks("-m", "tests.distributed_worker", tmp_path, *(path for pair in models for path in pair))
    for i, (main_dir, draft_dir) in enumerate(models):
        model, tokenizer, _ = load_model(main_dir)
        expected = outputs(model, tokenizer, *load_model(draft_dir)[:2])
        sharded = np.load(tmp_path / f"{i}.npz")
        assert (sharded["ranks"], sharded["heads"]) == (2, model.args.num_heads // 2)
        np.testing.assert_allclose(sharded["logits"], expected["logits"], atol=1e-4, rtol=0, err_msg=str(i))
        assert sharded["regular"].tolist() == expected["regular"].tolist()
        assert sharded["speculative"].tolist() == expected["speculative"].tolist()
        assert sharded["sampled"].tolist() == expected["sampled"].tolist()
        assert sharded["batched"].tolist() == expected["batched"].tolist()


def test_main_under_two_ranks_prints_once_the_tokens_of_one_process(models, tmp_path):
    main_dir, draft_dir = models[1]
    # --num-draft auto: the ranks take the same step times, so they choose the same draft lengths (or they would hang).
    flags = ["--prompt", PROMPT, "-m", MAX_TOKENS, "--num-draft", "auto", "--ignore-eos", "--json"]
    (_, stdout, _, _), (_, rank1_stdout, rank1_stderr, _) = run_ranks(
        "main.py", "--model-name", main_dir, "--draft-model-name", draft_dir, *flags
    )
    # Only rank 0 prints (a warning at import, such as kernels not built, comes before main.py can silence a rank).
    assert rank1_stdout == "" and "loading" not in rank1_stderr and "error" not in rank1_stderr
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    expected = outputs(*load_model(main_dir)[:2], *load_model(draft_dir)[:2])
    assert json.loads(lines[0])["tokens"] == expected["speculative"].tolist()


def test_a_model_that_does_not_split_is_refused(models):
    # 4 heads over 3 ranks: refused while sharding, before any communication.
    with pytest.raises(ModelLoadError, match="cannot be split across 3 ranks"):
        load_model(models[0][0], group=PlanGroup(3))


class ShardedShapes:
    """Stands in for a sharded model: read_rank_slices asks it only for its parameters' shapes."""

    def __init__(self, shapes):
        self.shapes = shapes

    def parameters(self):
        return {name: mx.zeros(shape) for name, shape in self.shapes.items()}


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_each_rank_reads_its_slices_in_every_dtype_and_over_several_chunks(dtype, tmp_path):
    # Columns are read a few MB of rows at a time: 5000 rows of 1024 take 2-5 chunks, as real models' layers do.
    mx.random.seed(0)
    weights = {
        "rows": mx.random.normal((6, 10)).astype(dtype),
        "columns": mx.random.normal((5000, 1024)).astype(dtype),
        "whole": mx.random.normal((7,)).astype(dtype),
    }
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), weights)
    ranks = 4
    for rank in range(ranks):
        expected = {
            "columns": weights["columns"][:, rank * 256 : (rank + 1) * 256],
            "whole": weights["whole"],
        }
        model = ShardedShapes({"rows": (6, 10), "columns": (5000, 256), "whole": (7,)})
        read = read_rank_slices([path], model, rank, ranks)
        for name in ("columns", "whole"):
            assert read[name].dtype == dtype, name
            assert mx.array_equal(read[name], expected[name]).item(), (name, rank)
    halves = ShardedShapes({"rows": (3, 10), "columns": (5000, 1024), "whole": (7,)})
    for rank in range(2):
        read = read_rank_slices([path], halves, rank, 2)
        assert read["rows"].dtype == dtype
        assert mx.array_equal(read["rows"], weights["rows"][rank * 3 : (rank + 1) * 3]).item()
        assert mx.array_equal(read["columns"], weights["columns"]).item()
