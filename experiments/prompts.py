"""The sweep's prompts: the reference outputs of a prompt file (read as main.py reads it), and truncation."""

import re

from prompt_file import read_records

# A T5 task prefix: up to five words and a colon ("complete:", "translate English to German:").
TASK_PREFIX = re.compile(r"((?:[\w-]+ ){0,4}[\w-]+:)\s+(.*)", re.S)


def read_references(path):
    """The "reference" output of every prompt of a JSON Lines prompt file, or None where a line has none.

    Call after read_prompts, which checks the file.
    """
    references = [record.get("reference") for record in read_records(path)]
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
