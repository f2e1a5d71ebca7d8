"""A config.json whose sizes the weights do not have is refused from the files' headers, before any model is built;
convert.py removes the staging directories a killed conversion left, and nothing else."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import convert
import model as model_module
from loader import ModelLoadError, load_model

HUGE = dict(num_layers=100_000, num_decoder_layers=100_000, d_ff=2**30)


def forbid_building_a_model(monkeypatch):
    """From now on, building a T5 fails the test."""

    def refuse(self, args):
        raise AssertionError(f"a model of {args.num_layers} layers was built")

    monkeypatch.setattr(model_module.T5, "__init__", refuse)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (HUGE, "100000 layers"),
        (dict(d_ff=2**30), "implies (1073741824, 32)"),
        (dict(vocab_size=50_000), "implies (50000, 32)"),
    ],
    ids=["huge", "d_ff", "vocab_size"],
)
def test_a_config_the_weights_do_not_match_is_refused_before_a_model_is_built(
    changes, expected, converted, tmp_path, monkeypatch
):
    path = tmp_path / "model"
    shutil.copytree(converted("t5-v1_1"), path)
    forbid_building_a_model(monkeypatch)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    print(f"refused in {time.perf_counter() - start:.3f} s: {error.value}")
    assert expected in str(error.value)
    assert "convert.py" in str(error.value)


def test_convert_refuses_a_huge_config_before_building_a_model(hf_checkpoint, tmp_path, monkeypatch):
    source = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("t5"), source)
    forbid_building_a_model(monkeypatch)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **HUGE}))
    with pytest.raises(convert.ConversionError, match="100000 layers"):
        convert.convert(str(source), mlx_path=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def owned_staging(parent, name, **owner):
    """A staging directory as convert.py makes one, its owner file naming `owner`, with a file inside."""
    path = parent / name
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"\0" * 1000)
    (path / convert.OWNER_FILE).write_text(json.dumps(owner))
    return path


def ended_process():
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_stale_staging_directories_of_convert_are_removed(hf_checkpoint, tmp_path):
    host, pid = socket.gethostname(), os.getpid()
    started = convert.process_start(pid)
    stale = [
        owned_staging(tmp_path, ".t5.tmp-killed", host=host, pid=ended_process(), started=1),
        owned_staging(tmp_path, ".other.old-killed", host=host, pid=ended_process(), started=None),
        # The id now belongs to a process started after the owner: the owner is gone.
        owned_staging(tmp_path, ".t5.tmp-reused", host=host, pid=pid, started=started - 1),
    ]
    kept = [
        owned_staging(tmp_path, ".t5.tmp-running", host=host, pid=pid, started=started),
        owned_staging(tmp_path, ".t5.tmp-elsewhere", host=host + "-another", pid=ended_process(), started=1),
        owned_staging(tmp_path, ".t5.tmp-unreadable", pid="12"),
    ]
    foreign = tmp_path / ".t5.tmp-mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not convert.py's")
    not_a_directory = tmp_path / ".t5.tmp-file"
    not_a_directory.write_text(json.dumps({"host": host, "pid": ended_process()}))
    link = tmp_path / ".t5.old-link"
    link.symlink_to(stale[0])

    convert.convert(str(hf_checkpoint("t5")), mlx_path=str(tmp_path / "t5"))
    assert [path.exists() for path in stale] == [False] * 3
    assert all((path / "model.safetensors").exists() for path in kept) and (foreign / "notes.txt").exists()
    assert not_a_directory.exists() and link.is_symlink()
    assert (tmp_path / "t5" / "config.json").exists() and not (tmp_path / "t5" / convert.OWNER_FILE).exists()


KILLED_CONVERSION = """
import sys, time
from pathlib import Path
import convert
with convert.staging_dir(Path(sys.argv[1]), force=False) as staging:
    (staging / "model.safetensors").write_bytes(b"0" * 1000)
    print(staging, flush=True)
    time.sleep(120)
"""


def test_a_killed_conversion_is_cleaned_up_by_the_next(hf_checkpoint, tmp_path):
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_CONVERSION, str(tmp_path / "first")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as process:
        staging = tmp_path / process.stdout.readline().strip()
        # While its owner runs, another conversion beside it leaves it alone.
        convert.convert(str(hf_checkpoint("t5")), mlx_path=str(tmp_path / "second"))
        assert (staging / "model.safetensors").exists()
        process.send_signal(signal.SIGKILL)
    assert staging.exists()
    convert.convert(str(hf_checkpoint("t5")), mlx_path=str(tmp_path / "third"))
    assert not staging.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["second", "third"]
