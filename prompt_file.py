"""Prompt files, as main.py's --prompt-file and the experiments read them: one prompt per line, or JSON Lines whose
lines are objects with a "prompt" (and, for the experiments, a "reference" output) or JSON strings. And the results
file of a --prompt-file run (--output): one JSON line per prompt, written as each is done, read back to --resume."""

import json
import signal
from pathlib import Path
from typing import List

HINT = 'write one prompt per line, or JSON Lines with a "prompt" field'


class PromptFileError(ValueError):
    """A prompt file that cannot be read or holds no prompt; the message says what to write instead."""


class ResultsFileError(ValueError):
    """A results file that cannot be written, or read back as one written for the prompts; the message says what to
    pass instead."""


def read_records(path) -> List[dict]:
    """Every prompt in the file at `path`, in order, as {"prompt": text} plus the other fields of its JSON line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"no prompt file at {path}; pass an existing file ({HINT})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read the prompt file {path}: {e}; pass a UTF-8 text file ({HINT})") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PromptFileError(f"the prompt file {path} has no prompts; {HINT}")
    # Plain text unless the file is .jsonl or its first prompt line is a JSON object.
    if path.suffix != ".jsonl" and not is_json_object(numbered[0][1]):
        return [{"prompt": line} for _, line in numbered]
    records = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path} line {number} is not JSON ({e.msg}); {HINT}") from None
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise PromptFileError(f'{path} line {number} has no "prompt" text; {HINT}')
        records.append(record)
    return records


def read_prompts(path) -> List[str]:
    """The prompts in the file at `path`, in order; raises PromptFileError when there are none to read."""
    return [record["prompt"] for record in read_records(path)]


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_results(path, prompts):
    """{index: result} of the lines an earlier --output run wrote to `path` for `prompts`. A line cut short by a
    killed run is removed, so that the results appended next start on a line of their own."""
    if not path.exists():
        return {}
    hint = "pass the --prompt-file it was written for, or another --output"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResultsFileError(f"cannot read {path} to resume it ({e}); {hint}") from None
    end = data.rfind(b"\n") + 1
    if end < len(data) and not data[end:].startswith(RESULT_START):
        raise ResultsFileError(f"{path} does not end in a result written by --output; {hint}")
    results = {}
    for number, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), 1):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            result = None
        index = result.get("index") if isinstance(result, dict) else None
        if not (isinstance(index, int) and 0 <= index < len(prompts) and result.get("prompt") == prompts[index]):
            raise ResultsFileError(
                f"{path} line {number} is not a result of --output for a prompt of this prompt file; {hint}"
            )
        results[index] = result
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return results


# How every line of an --output file begins.
RESULT_START = b'{"index": '


class OutputFile:
    """The --output file of a --prompt-file run: one JSON line per result, on disk as soon as it is written. Each line
    goes out in one unbuffered write with Ctrl-C held off, so the line a Ctrl-C prints counts exactly the lines kept."""

    def __init__(self, path, total, done):
        self.path, self.total, self.done, self.written = path, total, done, 0
        try:
            self.file = open(path, "ab", buffering=0)
        except OSError as e:
            raise ResultsFileError(f"cannot write {path} ({e}); pass an --output in a writable directory") from None

    def write(self, result):
        line = (json.dumps(result) + "\n").encode("utf-8")
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            while line:
                line = line[self.file.write(line) :]
            self.written += 1
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def summary(self):
        return (
            f"{self.written} results written to {self.path} in this run, {self.done + self.written} of "
            f"{self.total} prompts done"
        )
