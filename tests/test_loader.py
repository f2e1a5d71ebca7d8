"""Loading a converted directory that is broken, file by file: one message naming the problem and a safe fix."""

import json
import os
import shlex
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import ROOT

from loader import ModelLoadError, load_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def edit_json(file, **changes):
    value = json.loads(file.read_text())
    file.write_text(json.dumps({**value, **changes}))


def edit_mlx(path, **changes):
    config = json.loads((path / "config.json").read_text())
    edit_json(path / "config.json", mlx={**config["mlx"], **changes})


def drop_key(path, key):
    config = json.loads((path / "config.json").read_text())
    del config[key]
    (path / "config.json").write_text(json.dumps(config))


def edit_header(file, edit):
    """Rewrite the safetensors header of `file` with `edit(header)`, keeping the tensor data as it is."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def set_entry(name, **changes):
    return lambda header: header[name].update(changes)


def truncate(file, fraction=0.5):
    os.truncate(file, int(file.stat().st_size * fraction))


def move_tensor_in_index(path):
    index = path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    first, last = sorted(set(weight_map.values()))[0], sorted(set(weight_map.values()))[-1]
    name = next(name for name, file in weight_map.items() if file == first)
    edit_json(index, weight_map={**weight_map, name: last})


# case -> (which conversion, damage, fragments the message must contain)
BROKEN = {
    # config.json
    "config-missing": ("float", lambda p: (p / "config.json").unlink(), ["config.json is missing"]),
    "config-empty": ("float", lambda p: (p / "config.json").write_text(""), ["config.json is empty"]),
    "config-truncated": ("float", lambda p: truncate(p / "config.json"), ["config.json is not valid JSON"]),
    "config-not-object": ("float", lambda p: (p / "config.json").write_text("[1]"), ["not a JSON object"]),
    "config-lacks-key": ("float", lambda p: drop_key(p, "d_model"), ["config.json lacks d_model"]),
    "config-lacks-mlx": ("float", lambda p: drop_key(p, "mlx"), ["lacks mlx"]),
    "config-string-size": (
        "float",
        lambda p: edit_json(p / "config.json", d_model="32"),
        ["d_model must be an integer, got '32'"],
    ),
    "config-zero-heads": ("float", lambda p: edit_json(p / "config.json", num_heads=0), ["num_heads must be at least"]),
    "config-bool-flag": (
        "float",
        lambda p: edit_json(p / "config.json", tie_word_embeddings="yes"),
        ["tie_word_embeddings must be true or false"],
    ),
    "config-activation": (
        "float",
        lambda p: edit_json(p / "config.json", feed_forward_proj="gated-tanh"),
        ["feed_forward_proj 'gated-tanh'"],
    ),
    "config-bigger-model": ("float", lambda p: edit_json(p / "config.json", d_ff=48), ["has shape", "implies"]),
    "config-fewer-layers": ("float", lambda p: edit_json(p / "config.json", num_layers=1), ["unexpected"]),
    "config-null-size": ("float", lambda p: edit_json(p / "config.json", vocab_size=None), ["lacks vocab_size"]),
    "config-token-id": (
        "float",
        lambda p: edit_json(p / "config.json", eos_token_id=384),
        ["eos_token_id 384 is not below vocab_size 384"],
    ),
    "mlx-fp32-modules": ("float", lambda p: edit_mlx(p, fp32_modules="wo"), ["mlx.fp32_modules must be a list"]),
    "mlx-dtype": ("float", lambda p: edit_mlx(p, dtype="float64"), ["mlx must say the dtype"]),
    "mlx-dtype-lies": ("float", lambda p: edit_mlx(p, dtype="float16"), ["is F32, but config.json says F16"]),
    "mlx-embedding-dtype": (
        "float",
        lambda p: edit_mlx(p, linear_dtype="bfloat16", embedding_dtype="float16"),
        ["mlx.embedding_dtype must be absent or bfloat16"],
    ),
    "mlx-embedding-dtype-alone": (
        "float",
        lambda p: edit_mlx(p, embedding_dtype="bfloat16"),
        ["mlx.embedding_dtype must be absent or bfloat16 (with linear_dtype)"],
    ),
    # model.safetensors
    "weights-missing": ("float", lambda p: (p / "model.safetensors").unlink(), ["model.safetensors is missing"]),
    "weights-empty": ("float", lambda p: (p / "model.safetensors").write_bytes(b""), ["model.safetensors is empty"]),
    "weights-header-cut": (
        "float",
        lambda p: truncate(p / "model.safetensors", 0.001),
        ["model.safetensors is truncated or not a safetensors file"],
    ),
    "weights-data-cut": ("float", lambda p: truncate(p / "model.safetensors", 0.9), ["truncated", "bytes of tensor"]),
    "weights-too-long": (
        "float",
        lambda p: (p / "model.safetensors").open("ab").write(b"\0" * 64),
        ["longer than its header says"],
    ),
    "weights-not-safetensors": (
        "float",
        lambda p: (p / "model.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64),
        ["model.safetensors is truncated or not a safetensors file"],
    ),
    "header-garbage": (
        "float",
        lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{not js}"),
        ["corrupt safetensors header"],
    ),
    "header-dtype": (
        "float",
        lambda p: edit_header(p / "model.safetensors", set_entry("shared.weight", dtype="I32")),
        ["shared.weight has dtype I32"],
    ),
    "header-byte-count": (
        "float",
        lambda p: edit_header(p / "model.safetensors", set_entry("shared.weight", dtype="F16")),
        ["the header gives shared.weight 49152 bytes, F16 [384, 32] needs 24576"],
    ),
    "header-shape": (
        "float",
        lambda p: edit_header(p / "model.safetensors", set_entry("shared.weight", shape=[32, 384])),
        ["shared.weight has shape (32, 384), config.json implies (384, 32)"],
    ),
    "header-metadata": (
        "float",
        lambda p: edit_header(p / "model.safetensors", lambda header: header.update(__metadata__="mlx", x=1)),
        ["corrupt safetensors header", "'x'"],
    ),
    "header-entry": (
        "float",
        lambda p: edit_header(p / "model.safetensors", set_entry("shared.weight", data_offsets=[0])),
        ["corrupt safetensors header", "shared.weight"],
    ),
    # sharded weights
    "shard-missing": (
        "sharded",
        lambda p: (p / "model-00002-of-00011.safetensors").unlink(),
        ["names model-00002-of-00011.safetensors, which is missing"],
    ),
    "shard-truncated": ("sharded", lambda p: truncate(p / "model-00003-of-00011.safetensors"), ["00003", "truncated"]),
    "index-missing": (
        "sharded",
        lambda p: (p / "model.safetensors.index.json").unlink(),
        ["model.safetensors.index.json is missing"],
    ),
    "index-corrupt": ("sharded", lambda p: truncate(p / "model.safetensors.index.json"), ["not valid JSON"]),
    "index-no-map": ("sharded", lambda p: edit_json(p / "model.safetensors.index.json", weight_map=[]), ["weight_map"]),
    "index-escapes": (
        "sharded",
        lambda p: edit_json(p / "model.safetensors.index.json", weight_map={"shared.weight": "../model.safetensors"}),
        ["weight_map"],
    ),
    "index-lies": ("sharded", move_tensor_in_index, ["does not hold", "against model.safetensors.index.json"]),
    # quantization
    "quantized-config-null": ("quantized", lambda p: edit_mlx(p, quantization=None), ["mlx.quantization null"]),
    "quantized-bits-lie": (
        "quantized",
        lambda p: edit_mlx(p, quantization={"group_size": 32, "bits": 8}),
        ["is not packed as", "8 bits, groups of 32"],
    ),
    "quantized-float-group": (
        "quantized",
        lambda p: edit_mlx(p, quantization={"group_size": 32.0, "bits": 4}),
        ["mlx.quantization must be"],
    ),
    "quantized-bad-bits": (
        "quantized",
        lambda p: edit_mlx(p, quantization={"group_size": 32, "bits": 7}),
        ["mlx.quantization must be"],
    ),
    "quantized-scales-dtype-lie": (
        "quantized",
        lambda p: edit_mlx(p, quantization={"group_size": 32, "bits": 4, "scales_dtype": "float32"}),
        ["scales is BF16, but config.json says F32"],
    ),
    "quantized-scales-dtype-bad": (
        "quantized",
        lambda p: edit_mlx(p, quantization={"group_size": 32, "bits": 4, "scales_dtype": "int8"}),
        ["mlx.quantization.scales_dtype must be a float dtype"],
    ),
    "float-says-quantized": (
        "float",
        lambda p: edit_mlx(p, quantization={"group_size": 32, "bits": 4}),
        ["says the weights are quantized, but none is"],
    ),
    # tokenizer
    "tokenizer-absent": (
        "float",
        lambda p: [(p / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
        ["has no tokenizer"],
    ),
    "tokenizer-vocabulary-absent": ("float", lambda p: (p / "tokenizer.json").unlink(), ["has no tokenizer"]),
    "tokenizer-truncated": ("float", lambda p: truncate(p / "tokenizer.json"), ["tokenizer.json is not valid JSON"]),
    "tokenizer-empty": ("float", lambda p: (p / "tokenizer.json").write_text(""), ["tokenizer.json is empty"]),
    "tokenizer-config-corrupt": (
        "float",
        lambda p: (p / "tokenizer_config.json").write_text("{"),
        ["tokenizer_config.json is not valid JSON"],
    ),
    "spiece-corrupt": (
        "float",
        lambda p: (p / "spiece.model").write_bytes(b"\x0a\xff garbage"),
        ["spiece.model is not a SentencePiece model"],
    ),
    "generation-config-corrupt": (
        "float",
        lambda p: (p / "generation_config.json").write_text("nul"),
        ["generation_config.json is not valid JSON"],
    ),
}


@pytest.fixture(scope="module")
def conversions(converted, hf_checkpoint):
    """One small model, converted three ways."""
    return {
        "float": converted("t5"),
        "sharded": converted("t5", max_shard_size=20_000),
        "quantized": converted("t5", quantize=True, q_group_size=32),
        "source": hf_checkpoint("t5"),
    }


def broken_copy(conversions, tmp_path, case):
    kind, damage, _ = BROKEN[case]
    path = tmp_path / case
    shutil.copytree(conversions[kind], path)
    damage(path)
    return path


def load_error(path):
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    return str(error.value)


def test_the_undamaged_conversions_load(conversions):
    assert {"model-00002-of-00011.safetensors", "model.safetensors.index.json"} <= {
        file.name for file in conversions["sharded"].iterdir()
    }
    for kind in ("float", "sharded", "quantized"):
        _, tokenizer, config = load_model(conversions[kind], lazy=True)
        assert len(tokenizer) == 350 and config["vocab_size"] == 384


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_file_is_named_with_the_command_that_fixes_it(case, conversions, tmp_path):
    path = broken_copy(conversions, tmp_path, case)
    message = load_error(path)
    assert all(fragment in message for fragment in BROKEN[case][2]), message
    # A conversion damaged in place: convert.py may replace it, since it holds nothing else. Its source is known
    # where config.json still records it.
    unrecorded = {"config-missing", "config-empty", "config-truncated", "config-not-object", "config-lacks-mlx"}
    source = "<checkpoint>" if case in unrecorded else conversions["source"]
    assert message.endswith(f"convert it again with: python convert.py --model {source} --mlx-path {path} --force")


def test_a_directory_with_other_files_is_never_suggested_for_replacement(conversions, tmp_path):
    path = broken_copy(conversions, tmp_path, "weights-data-cut")
    (path / "notes.txt").write_text("the user's own")
    message = load_error(path)
    assert "--force" not in message
    assert f"--mlx-path {path}-mlx " in message and "holds files convert.py did not write" in message


def test_a_transformers_checkpoint_is_recognised(conversions, tmp_path):
    source = tmp_path / "t5-hf"
    shutil.copytree(conversions["source"], source)
    message = load_error(source)
    assert f"{source} is a transformers t5 checkpoint, not converted for MLX" in message
    assert message.endswith(f"convert it with: python convert.py --model {source} --mlx-path {source}-mlx")
    # Without config.json, PyTorch weights still give it away.
    (source / "config.json").unlink()
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    assert "a transformers checkpoint (pytorch_model.bin) without config.json" in load_error(source)
    assert "not a directory" in load_error(tmp_path / "nowhere")


def test_no_other_tokenizer_stands_in_for_a_missing_one(conversions, tmp_path, monkeypatch):
    # Online, transformers builds an empty T5 tokenizer from config.json's model_type for such a directory (the hub is
    # out of reach here): AutoTokenizer hands back a stand-in, which the loader must not take for the model's own.
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: object())
    path = broken_copy(conversions, tmp_path, "tokenizer-absent")
    assert "has no tokenizer" in load_error(path)


def run(command, cwd=ROOT):
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    lines = [line for line in lines if line.strip() and not line.startswith(("loading ", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def suggested_command(line):
    return shlex.split(line.split(" with: ")[-1])


@pytest.mark.parametrize("case", ["tokenizer-absent"])
def test_main_prints_one_line_and_its_command_repairs_the_directory(case, conversions, tmp_path):
    path = broken_copy(conversions, tmp_path, case)
    result = run([sys.executable, "main.py", "--model-name", path, "--regular-decode", "-m", "2"])
    command = suggested_command(assert_one_error_line(result, "cannot load the main model", *BROKEN[case][2]))
    assert command[:2] == ["python", "convert.py"] and command[-1] == "--force"
    assert run([sys.executable, *command[1:]]).returncode == 0
    load_model(path, lazy=True)


def test_main_converts_a_transformers_checkpoint_only_into_a_new_directory(conversions, tmp_path):
    source = tmp_path / "t5-hf"
    shutil.copytree(conversions["source"], source)
    before = {file.name: file.read_bytes() for file in source.iterdir()}
    result = run([sys.executable, "main.py", "--model-name", source, "--draft-model-name", source])
    command = suggested_command(assert_one_error_line(result, "is a transformers t5 checkpoint"))
    assert "--force" not in command
    assert run([sys.executable, *command[1:]]).returncode == 0
    assert {file.name: file.read_bytes() for file in source.iterdir()} == before
    load_model(f"{source}-mlx", lazy=True)


def test_the_demo_pair_leaves_a_directory_of_the_users_alone(tmp_path):
    # main.py with no model runs the bundled demo pair, converted into mlx_models/demo-main: here the user's.
    own = tmp_path / "mlx_models" / "demo-main"
    own.mkdir(parents=True)
    (own / "notes.txt").write_text("the user's own")
    result = run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # After the line saying that the demo pair runs.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert "mlx_models/demo-main is in the way of the bundled demo pair" in lines[-1]
    assert "converting" not in result.stderr
    assert [file.name for file in own.iterdir()] == ["notes.txt"]


TOKENIZER_TEXTS = [
    "translate English to German: The house is wonderful.",
    "  two  spaces,\ttabs\nand a newline  ",
    "Grüße aus Köln: ß, é, 3.5 % – <extra_id_0> and </s> written out",
    "",
]


@pytest.mark.parametrize("case", ["conversion", "demo", "no class named", "fast class named"])
def test_the_tokenizer_is_the_one_autotokenizer_loads(case, conversions, tmp_path):
    # The loader imports T5's tokenizer class from its own module (AutoTokenizer would import PyTorch to read the
    # config); what it loads must be what AutoTokenizer loads from the same files.
    from transformers import AutoTokenizer

    from loader import read_tokenizer

    source = conversions["float"] if case == "conversion" else ROOT / "models" / "demo" / "main"
    path = tmp_path / "copy"
    shutil.copytree(source, path)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    if case == "no class named":
        del settings["tokenizer_class"]
    elif case == "fast class named":
        settings["tokenizer_class"] = "T5TokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    config = json.loads((path / "config.json").read_text())

    ours, reference = read_tokenizer(path, config), AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(reference)
    assert len(ours) == len(reference) and ours.get_vocab() == reference.get_vocab()
    assert ours.all_special_ids == reference.all_special_ids and ours.eos_token_id == reference.eos_token_id
    for text in TOKENIZER_TEXTS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_loading_a_model_imports_no_pytorch(conversions):
    code = (
        "import sys; from loader import load_model; load_model(sys.argv[1], lazy=True); "
        "sys.exit('torch' in sys.modules)"
    )
    result = run([sys.executable, "-c", code, str(conversions["float"])])
    assert result.returncode == 0, result.stderr
