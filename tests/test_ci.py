"""CI runs exactly the README's install and test commands."""

import re

from conftest import ROOT


def readme_commands(section):
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for section in ("Install", "Tests"):
        commands = readme_commands(section)
        assert commands, f"README has no commands under '## {section}'"
        for command in commands:
            # CI may guard a command (`... || echo ...`) but must run it as written.
            runs = any(line == command or line.startswith(command + " ||") for line in ci_lines)
            assert runs, f"{command!r} from the README is not run by .ci/run"
