"""prompt_file.py: the prompt files main.py's --prompt-file and the experiments read."""

import pytest

from prompt_file import PromptFileError, read_prompts, read_records


def test_prompt_files_are_lines_or_json_lines(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("complete: a = 1\n\nsummarize: {not json}\n")
    assert read_prompts(lines) == ["complete: a = 1", "summarize: {not json}"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "complete: a = 1", "id": 3}\n"summarize: b"\n')
    assert read_prompts(jsonl) == ["complete: a = 1", "summarize: b"]
    jsonl.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(PromptFileError, match='prompts.jsonl line 1 has no "prompt"'):
        read_prompts(jsonl)


def test_json_lines_keep_their_other_fields(tmp_path):
    jsonl = tmp_path / "prompts.txt"  # JSON Lines by its first line, whatever the suffix
    jsonl.write_text('{"prompt": "a", "reference": "b"}\n\n{"prompt": "c"}\n')
    assert read_records(jsonl) == [{"prompt": "a", "reference": "b"}, {"prompt": "c"}]


@pytest.mark.parametrize(
    "text, message",
    [
        ("\n  \n", "has no prompts"),
        ('{"prompt": "a"}\n{"prompt": ', "line 2 is not JSON"),
        ('{"prompt": "a"}\n{"prompt": "  "}\n', 'line 2 has no "prompt" text'),
    ],
)
def test_a_file_without_usable_prompts_is_refused(tmp_path, text, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(path)
    with pytest.raises(PromptFileError, match="no prompt file at"):
        read_prompts(tmp_path / "missing.txt")
