"""The documentation covers the public API."""

import pathlib
import re
import types

import curvzoo as cz


PAGES = pathlib.Path(__file__).parent.parent / "docs" / "pages"


def _public(module, prefix):
    """Public names of `module`, leaving out imported modules (the test-time type
    checker's import hook adds one), except curvzoo's own submodules."""
    return {
        f"{prefix}.{name}"
        for name in dir(module)
        if not name.startswith("_")
        and (
            not isinstance(getattr(module, name), types.ModuleType)
            or getattr(module, name).__name__.startswith("curvzoo.")
        )
    }


def test_every_public_name_is_in_the_api_pages():
    documented = set()
    for page in (PAGES / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: (\S+)", page.read_text(), re.M))
    public = (
        _public(cz, "curvzoo") - {"curvzoo.losses", "curvzoo.analysis", "curvzoo.optim"}
        | _public(cz.losses, "curvzoo.losses")
        | _public(cz.analysis, "curvzoo.analysis")
        | _public(cz.optim, "curvzoo.optim")
    )
    public.discard("curvzoo.__version__")
    assert public <= documented, sorted(public - documented)


def test_every_page_is_in_the_navigation():
    config = (PAGES.parent / "mkdocs.yml").read_text()
    for page in PAGES.rglob("*.md"):
        assert str(page.relative_to(PAGES)) in config, page
