"""tools/random_checkpoint.py: a sharded random checkpoint that transformers and convert.py both read."""

import json

import pytest
import torch
from transformers import T5ForConditionalGeneration

from tools import random_checkpoint


@pytest.fixture
def tiny_shape(monkeypatch):
    # A t5-11b-like layout (heads * d_kv != d_model) at a tiny size, in shards of about 64 KB.
    monkeypatch.setitem(random_checkpoint.SHAPES, "tiny", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=16))
    monkeypatch.setattr(random_checkpoint, "SHARD_BYTES", 1 << 16)
    return "tiny"


def test_random_checkpoint_loads_in_transformers_and_converts(tiny_shape, tmp_path):
    import convert

    out = tmp_path / "random"
    assert random_checkpoint.main(["--shape", tiny_shape, "--out", str(out), "--dtype", "float32"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    model, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_heads * model.config.d_kv != model.config.d_model
    # Layer norms are ones, the rest random with a standard deviation of fan_in^-1/2.
    state = model.state_dict()
    assert torch.equal(state["encoder.final_layer_norm.weight"], torch.ones(32))
    wo = state["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    assert abs(wo.std().item() - 64**-0.5) < 0.02
    assert (
        convert.convert(str(out), mlx_path=str(tmp_path / "mlx"), q_bits=4, q_group_size=32, quantize=True)
        / "config.json"
    ).is_file()


def test_random_checkpoint_refuses_an_existing_directory(tiny_shape, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert random_checkpoint.main(["--shape", tiny_shape, "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert list((tmp_path / "taken").iterdir()) == []
