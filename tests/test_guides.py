"""The guide pages' code runs as written (each page's blocks in order, one namespace)."""

import pathlib
import re

import pytest


PAGES = pathlib.Path(__file__).parent.parent / "docs" / "pages"
GUIDES = ["own-models.md", "losses.md"]


@pytest.mark.parametrize("page", GUIDES)
def test_guide_code_runs(page):
    text = (PAGES / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"{page} has no Python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGES / page), "exec"), namespace)
