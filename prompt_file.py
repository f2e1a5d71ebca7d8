"""Prompt files, as main.py's --prompt-file and the experiments read them: one prompt per line, or JSON Lines whose
lines are objects with a "prompt" (and, for the experiments, a "reference" output) or JSON strings."""

import json
from pathlib import Path
from typing import List

HINT = 'write one prompt per line, or JSON Lines with a "prompt" field'


class PromptFileError(ValueError):
    """A prompt file that cannot be read or holds no prompt; the message says what to write instead."""


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
