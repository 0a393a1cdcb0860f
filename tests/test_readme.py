"""The README's tour runs as written, and its first lines are the two set-up commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
CI = Path(__file__).resolve().parent.parent / ".ci" / "run"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first = _blocks("bash")[0].strip().splitlines()
    assert first == ['pip install . && pyro-nflows fit', 'pip install ".[test]" && python -m pytest -q']
    assert first[1] in CI.read_text().splitlines()


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files
    namespace = {}
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), namespace)
