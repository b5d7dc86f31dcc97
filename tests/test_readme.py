"""The README's example runs and says what it claims."""

import pathlib
import re


README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["diag"].cell.weight_hh is None
    assert namespace["model"].cell.weight_hh.shape == (48, 16)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"```bash\n(.*pytest.*)\n```", text).group(1)
    assert test_command in ci
