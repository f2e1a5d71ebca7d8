"""convert.py on tiny random checkpoints in every HF layout: exact tensors, output formats, atomicity, errors.

Nothing touches the network: conftest.py sets HF_HUB_OFFLINE=1.
"""

import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
from loader import load_model

ROOT = Path(__file__).resolve().parent.parent
# What original (pre-transformers-5) checkpoints carry and the converter drops.
DROPPED = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
UNUSED_BIAS = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def source_tensors(path) -> dict:
    """{MLX name: torch tensor} of an HF checkpoint directory holding model.safetensors."""
    tensors = load_file(path / "model.safetensors")
    return {convert.hf_to_mlx_key(name): tensor for name, tensor in tensors.items()}


def load_output(path) -> dict:
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


def run_convert(*args):
    """convert.py run as a user runs it, offline."""
    command = [sys.executable, str(ROOT / "convert.py"), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)


def copy_without_weights(source, destination):
    destination.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copyfile(file, destination / file.name)
    return destination


def write_bin_shards(tensors: dict, path, num_shards):
    # The layout transformers writes: pytorch_model.bin, or numbered shards plus an index.
    names = sorted(tensors)
    if num_shards == 1:
        torch.save(tensors, path / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = {name: tensors[name] for name in names[i::num_shards]}
        torch.save(shard, path / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def layouts(hf_checkpoint, tmp_path_factory):
    """The same untied (v1.1) checkpoint in every layout, plus a tied one saved sharded by transformers."""
    from transformers import AutoModelForSeq2SeqLM

    untied = hf_checkpoint("t5-v1_1")
    tied = hf_checkpoint("t5")
    root = tmp_path_factory.mktemp("layouts")
    # Original checkpoints also hold tied duplicates and an unused bias, which must be dropped.
    tensors = load_file(untied / "model.safetensors")
    extras = {name: tensors["shared.weight"].clone() for name in DROPPED}
    extras[UNUSED_BIAS] = torch.zeros(32, 4)
    layouts = {"safetensors": untied}
    for name, num_shards in [("bin", 1), ("sharded-bin", 3)]:
        layouts[name] = copy_without_weights(untied, root / name)
        write_bin_shards({**tensors, **extras}, layouts[name], num_shards)
    layouts["sharded-safetensors"] = root / "sharded-safetensors"
    AutoModelForSeq2SeqLM.from_pretrained(tied).save_pretrained(layouts["sharded-safetensors"], max_shard_size="20KB")
    for file in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copyfile(tied / file, layouts["sharded-safetensors"] / file)
    assert len(list(layouts["sharded-safetensors"].glob("model-*.safetensors"))) > 1
    return layouts


def test_flags_match_the_keyword_arguments_of_convert():
    flags = vars(convert.setup_arg_parser().parse_args(["--model", "t5-small"]))
    parameters = inspect.signature(convert.convert).parameters
    assert set(flags) == set(parameters) - {"max_shard_size"}
    assert all(flags[name] == parameters[name].default for name in flags if name != "model")


def test_hf_to_mlx_key():
    bias = "SelfAttention.relative_attention_bias.weight"
    cases = {
        "shared.weight": "shared.weight",
        "lm_head.weight": "lm_head.weight",
        "encoder.embed_tokens.weight": None,
        "decoder.embed_tokens.weight": None,
        UNUSED_BIAS: None,
        f"encoder.block.0.layer.0.{bias}": "encoder.relative_attention_bias.weight",
        f"decoder.block.0.layer.0.{bias}": "decoder.relative_attention_bias.weight",
        "encoder.block.3.layer.0.SelfAttention.k.weight": "encoder.layers.3.self_attn.k.weight",
        "decoder.block.11.layer.0.layer_norm.weight": "decoder.layers.11.self_attn_norm.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi_1.weight": "encoder.layers.1.mlp.wi_1.weight",
        "encoder.block.1.layer.1.layer_norm.weight": "encoder.layers.1.mlp_norm.weight",
        "decoder.block.2.layer.1.EncDecAttention.o.weight": "decoder.layers.2.cross_attn.o.weight",
        "decoder.block.2.layer.1.layer_norm.weight": "decoder.layers.2.cross_attn_norm.weight",
        "decoder.block.2.layer.2.DenseReluDense.wo.weight": "decoder.layers.2.mlp.wo.weight",
        "decoder.block.2.layer.2.layer_norm.weight": "decoder.layers.2.mlp_norm.weight",
        "encoder.final_layer_norm.weight": "encoder.final_norm.weight",
    }
    for name, expected in cases.items():
        assert convert.hf_to_mlx_key(name) == expected, name
    for unknown in [
        f"encoder.block.1.layer.0.{bias}",
        "lm_head.bias",
        "encoder.block.0.layer.2.layer_norm.weight",
    ]:
        with pytest.raises(convert.ConversionError, match="unknown tensor"):
            convert.hf_to_mlx_key(unknown)


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_every_layout_converts_to_the_source_tensors(layout, layouts, hf_checkpoint, tmp_path):
    out = convert.convert(str(layouts[layout]), mlx_path=str(tmp_path / "out"))
    untied = layout != "sharded-safetensors"
    expected = source_tensors(hf_checkpoint("t5-v1_1" if untied else "t5"))
    weights = load_output(out)
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == mx.float32
        assert np.array_equal(np.asarray(weights[name]), tensor.numpy()), name

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is not untied and ("lm_head.weight" in weights) is untied
    assert config["scale_decoder_outputs"] is not untied
    assert config["mlx"] == {
        "dtype": "float32",
        "quantization": None,
        "fp32_modules": [],
        "source": str(layouts[layout]),
    }
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (out / file).read_bytes() == (layouts[layout] / file).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left


def test_output_shards_round_trip(hf_checkpoint, tmp_path):
    source = hf_checkpoint("t5-v1_1")
    single = load_output(convert.convert(str(source), mlx_path=str(tmp_path / "single")))
    max_shard_size = 20_000
    out = convert.convert(str(source), mlx_path=str(tmp_path / "sharded"), max_shard_size=max_shard_size)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    sharded = {}
    for file in files:
        weights = mx.load(str(out / file))
        assert all(index["weight_map"][name] == file for name in weights)
        data_size = sum(w.nbytes for w in weights.values())
        assert data_size <= max_shard_size or len(weights) == 1
        with open(out / file, "rb") as f:  # header: u64 length, then JSON padded with spaces to 8 bytes
            header_size = struct.unpack("<Q", f.read(8))[0]
            assert header_size % 8 == 0
            assert json.loads(f.read(header_size))["__metadata__"] == {"format": "mlx"}
        assert (out / file).stat().st_size == 8 + header_size + data_size
        with safe_open(str(out / file), framework="numpy") as f:  # the reference reader validates the layout
            assert sorted(f.keys()) == sorted(weights)
        sharded.update(weights)
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in sharded.values())
    assert sorted(sharded) == sorted(single)
    assert all(mx.array_equal(sharded[name], single[name]) for name in single)


def test_float16_keeps_wo_in_float32(hf_checkpoint, tmp_path):
    source = hf_checkpoint("t5-v1_1")
    expected = source_tensors(source)
    for options in [{}, {"quantize": True, "q_group_size": 32}]:
        out = convert.convert(str(source), mlx_path=str(tmp_path / str(len(options))), dtype="float16", **options)
        weights = load_output(out)
        for name, tensor in expected.items():
            if name.endswith("mlp.wo.weight"):
                assert weights[name].dtype == mx.float32
                assert name.removesuffix("weight") + "scales" not in weights
                assert np.array_equal(np.asarray(weights[name]), tensor.numpy())
            elif not options:
                assert weights[name].dtype == mx.float16
                assert np.array_equal(np.asarray(weights[name]), tensor.half().numpy())
        assert json.loads((out / "config.json").read_text())["mlx"]["fp32_modules"] == ["wo"]
        load_model(out, lazy=True)
    assert weights["shared.scales"].dtype == mx.float16


def test_bfloat16_round_trips(hf_checkpoint, tmp_path):
    source = hf_checkpoint("t5")
    out = convert.convert(str(source), mlx_path=str(tmp_path / "out"), dtype="bfloat16")
    weights = load_output(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        reread = {name: f.get_tensor(name) for name in f.keys()}
    for name, tensor in source_tensors(source).items():
        bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert weights[name].dtype == mx.bfloat16
        assert np.array_equal(np.asarray(weights[name].view(mx.uint16)), bits), name
        assert torch.equal(reread[name], tensor.to(torch.bfloat16))
    load_model(out, lazy=True)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)])
def test_quantized_weights_dequantize_close_to_the_source(bits, group_size, hf_checkpoint, tmp_path):
    source = hf_checkpoint("t5-v1_1")
    options = {"quantize": True, "q_bits": bits, "q_group_size": group_size}
    out = convert.convert(str(source), mlx_path=str(tmp_path / "out"), **options)
    weights = load_output(out)
    quantized = 0
    for name, tensor in source_tensors(source).items():
        prefix = name.removesuffix(".weight")
        if tensor.ndim == 2 and "relative_attention_bias" not in name and tensor.shape[1] % group_size == 0:
            rows, columns = tensor.shape
            assert weights[name].dtype == mx.uint32 and weights[name].shape == (rows, columns * bits // 32)
            scales, biases = weights[f"{prefix}.scales"], weights[f"{prefix}.biases"]
            assert scales.shape == biases.shape == (rows, columns // group_size)
            # 4-bit linear layers' scales and biases are bfloat16 (convert.scales_dtype); the embeddings' float32.
            held = mx.bfloat16 if bits == 4 and name != "shared.weight" else mx.float32
            assert scales.dtype == biases.dtype == held
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
            restored = np.asarray(mx.dequantize(weights[name], scales, biases, group_size, bits))
            # MLX's affine quantization keeps each weight within one level spacing (`scale`) of the original; scales
            # and biases rounded to bfloat16 (relative error <= 2^-9) add at most 15 spacings' and the bias's error.
            rounding = 2**-8 if held == mx.bfloat16 else 0
            spread = np.abs(np.asarray(scales)) * (1 + 15 * rounding) + np.abs(np.asarray(biases)) * rounding
            tolerance = np.repeat(spread, group_size, axis=1) + 1e-6
            assert np.all(np.abs(restored - tensor.numpy()) <= tolerance), name
            quantized += 1
        else:
            assert f"{prefix}.scales" not in weights and weights[name].dtype == mx.float32
            assert np.array_equal(np.asarray(weights[name]), tensor.numpy())
    assert quantized >= (30 if group_size == 32 else 4)
    config = json.loads((out / "config.json").read_text())
    scales_dtype = "bfloat16" if bits == 4 else "float32"
    assert config["mlx"]["quantization"] == {"group_size": group_size, "bits": bits, "scales_dtype": scales_dtype}
    load_model(out, lazy=True)


def test_relative_attention_bias_is_never_quantized():
    # t5-11b has 128 heads, so the bias's last dim divides every group size.
    quantization = {"group_size": 64, "bits": 4}
    name = "encoder.relative_attention_bias.weight"
    plan = convert.plan_tensor(name, "x", (32, 128), mx.float32, quantization)
    assert not plan.quantize and plan.outputs == [(name, mx.float32, (32, 128))]
    assert convert.plan_tensor("shared.weight", "x", (32, 128), mx.float32, quantization).quantize


def test_default_output_path_is_under_mlx_models(hf_checkpoint, tmp_path, monkeypatch):
    source = hf_checkpoint("t5")
    monkeypatch.chdir(tmp_path)
    assert convert.convert(str(source)) == Path("mlx_models") / source.name
    assert (tmp_path / "mlx_models" / source.name / "model.safetensors").is_file()


@pytest.mark.parametrize("existing", ["directory", "file"])
def test_force_replaces_an_existing_output(existing, hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    if existing == "directory":
        out.mkdir()
        (out / "stale.txt").write_text("old")
    else:
        out.write_text("old")
    source = hf_checkpoint("t5")
    result = run_convert("--model", source, "--mlx-path", out, "--force", "-q", "--q-bits", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Saved {out} (peak ")
    copied = {name for name in convert.TOKENIZER_FILES if (source / name).is_file()}
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", *copied}
    assert json.loads((out / "config.json").read_text())["mlx"]["quantization"] == {
        "group_size": 64,
        "bits": 8,
        "scales_dtype": "float32",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_conversion_leaves_the_output_untouched(existing, hf_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_text("previous")
    calls = []

    def interrupt_midway(*args):
        calls.append(args)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return convert_tensor(*args)

    convert_tensor = convert.convert_tensor
    monkeypatch.setattr(convert, "convert_tensor", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(str(hf_checkpoint("t5")), mlx_path=str(out), force=True, max_shard_size=20_000)
    assert len(calls) == 10
    if existing:
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
        assert [p.name for p in out.iterdir()] == ["model.safetensors"]
        assert (out / "model.safetensors").read_text() == "previous"
    else:
        assert list(tmp_path.iterdir()) == []


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def edit_tensors(path, drop=(), **add):
    tensors = load_file(path / "model.safetensors")
    tensors = {name: tensor for name, tensor in tensors.items() if name not in drop}
    save_file({**tensors, **add}, path / "model.safetensors")


def drop_last_bytes(path, count):
    path.write_bytes(path.read_bytes()[:-count])


# case -> (how to damage a copy of a good checkpoint, command-line arguments, *what the message must say)
ERROR_CASES = {
    "hub-offline": (None, ["--model", "google/no-such-t5"], "hub could not be reached", "HF layout"),
    "not-a-hub-id": (None, ["--model", "no/such/dir"], "neither a directory nor a hub id"),
    "no-config": (lambda p: (p / "config.json").unlink(), [], "no config.json"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{"), [], "not a JSON object"),
    "not-t5": (lambda p: edit_config(p, model_type="bert"), [], "model_type='bert'"),
    "encoder-only": (lambda p: edit_config(p, architectures=["T5EncoderModel"]), [], "T5EncoderModel"),
    "activation": (lambda p: edit_config(p, feed_forward_proj="gated-foo"), [], "gated-foo"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), [], "no weights"),
    "missing-shard": (
        lambda p: (p / "model.safetensors")
        .rename(p / "model.safetensors.index.json")
        .write_text(json.dumps({"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}})),
        [],
        "model-00001-of-00002.safetensors, which is missing",
    ),
    "truncated-safetensors": (
        lambda p: drop_last_bytes(p / "model.safetensors", 100),
        [],
        "truncated or corrupt",
        "download it again",
    ),
    "corrupt-bin": (
        lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin").write_bytes(b"PK\x03\x04garbage"),
        [],
        "truncated or corrupt",
    ),
    "missing-tensor": (
        lambda p: edit_tensors(p, drop=["encoder.final_layer_norm.weight"]),
        [],
        "missing ['encoder.final_norm.weight']",
    ),
    "unexpected-tensor": (lambda p: edit_config(p, num_layers=1), [], "unexpected ['encoder.layers.1."),
    "wrong-shape": (lambda p: edit_config(p, d_ff=48), [], "has shape"),
    "unknown-tensor": (lambda p: edit_tensors(p, **{"pooler.weight": torch.zeros(2)}), [], "unknown tensor"),
    "output-exists": (lambda p: (p.parent / "out").mkdir(), [], "already exists", "--force"),
    "bad-flag": (None, ["--q-bits", "3"], "invalid choice"),
    "scales-of-another-dtype": (
        None,
        ["--dtype", "bfloat16", "-q", "--q-scales-dtype", "float32"],
        "--q-scales-dtype float32 needs --dtype float32",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_print_one_line_and_leave_nothing(case, hf_checkpoint, tmp_path):
    damage, args, *fragments = ERROR_CASES[case]
    source = tmp_path / "source"
    shutil.copytree(hf_checkpoint("t5"), source)
    if damage:
        damage(source)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = args if "--model" in args else ["--model", str(source), *args]
    result = run_convert(*args, "--mlx-path", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging directory


def test_offline_hub_id_converts_from_the_local_cache(hf_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The hub cache layout: refs/main names the commit whose snapshot holds the files.
    repo = tmp_path / "cache" / "models--acme--tiny-t5"
    shutil.copytree(hf_checkpoint("t5"), repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = convert.convert("acme/tiny-t5")
    assert out == Path("mlx_models/acme-tiny-t5")
    assert json.loads((out / "config.json").read_text())["mlx"]["source"] == "acme/tiny-t5"
    assert sorted(load_output(out)) == sorted(source_tensors(hf_checkpoint("t5")))
