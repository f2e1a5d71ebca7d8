"""The sweep's prompts: prompt files (with reference outputs where they have them), and truncation to a length."""

import json
import re

# A T5 task prefix: up to five words and a colon ("complete:", "translate English to German:").
TASK_PREFIX = re.compile(r"((?:[\w-]+ ){0,4}[\w-]+:)\s+(.*)", re.S)


class PromptFileError(Exception):
    """A prompt file that cannot be read or holds no usable prompt."""


def read_prompts(path):
    """Prompts from a text file (one per line) or JSON Lines (a string or an object with "prompt" per line).

    Raises PromptFileError when the file cannot be read or a line holds no prompt.
    """
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read the prompt file {path} ({e})") from e
    if path.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for line in lines):
        prompts = lines
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except ValueError as e:
                raise PromptFileError(f"{path}:{number} is not valid JSON ({e})") from e
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptFileError(
                    f'{path}:{number} has no prompt: give a string or an object with a non-empty "prompt" field'
                )
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"the prompt file {path} has no prompts")
    return prompts


def read_references(path):
    """The "reference" output of every line of a JSON Lines prompt file, or None where a line has none.

    Call after read_prompts, which checks the file.
    """
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not all(line.lstrip().startswith("{") for line in lines):
        return None
    references = [json.loads(line).get("reference") for line in lines]
    return references if all(isinstance(r, str) for r in references) else None


def truncate(prompt, tokens, tokenizer):
    """`prompt` with its task prefix kept and at most the last `tokens` tokens of the rest; 0 keeps it whole."""
    match = TASK_PREFIX.fullmatch(prompt)
    prefix, body = (match[1] + " ", match[2]) if match else ("", prompt)
    ids = tokenizer(body, add_special_tokens=False).input_ids
    if not tokens or len(ids) <= tokens:
        return prompt
    # The end of the text is kept: it is what a continuation follows on from. It starts at a word (a SentencePiece
    # piece with "▁"), so that it tokenizes back to at most `tokens` tokens.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    start = next((i for i in range(len(ids) - tokens, len(ids)) if pieces[i].startswith("▁")), len(ids) - tokens)
    return prefix + tokenizer.decode(ids[start:])
