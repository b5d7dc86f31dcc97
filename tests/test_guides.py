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


def test_every_recipe_is_quoted_by_the_regeneration_command():
    """Each recipe's page quotes its output between the markers that
    `docs/regenerate.py` rewrites, and the figure it draws is there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("regenerate", PAGES.parent / "regenerate.py")
    regenerate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regenerate)
    recipes = {path.stem for path in (PAGES.parent.parent / "recipes").glob("*.py")}
    assert recipes == {run.script for run in regenerate.RECIPES.values()}
    for name, run in regenerate.RECIPES.items():
        text = (PAGES / run.page).read_text()
        assert text.count(f"<!-- recipe-output: {name} -->") == 1, run.page
        if run.figure is not None:
            assert (PAGES / "figures" / f"{run.figure}.png").exists()
