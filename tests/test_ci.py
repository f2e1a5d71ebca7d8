"""CI runs exactly the README's quick start and install commands."""

import re

from conftest import ROOT


def readme_commands(section):
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_quick_start_and_install_commands():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for section in ("Quick start", "Install"):
        commands = readme_commands(section)
        assert commands, f"README has no commands under '## {section}'"
        for command in commands:
            # CI may guard a command (`... || echo ...`) but must run it as written.
            runs = any(line == command or line.startswith(command + " ||") for line in ci_lines)
            assert runs, f"{command!r} from the README is not run by .ci/run"


def test_the_quick_start_is_two_commands_install_and_run_then_test():
    first, second = readme_commands("Quick start")
    assert first.startswith("pip install . ") and first.endswith("python main.py")
    assert "python -m pytest tests" in second


def test_the_readme_is_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
