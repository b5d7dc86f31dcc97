"""Regenerate what the documentation quotes from the recipes: run every recipe in full,
copy its figure into `docs/pages/figures/`, and put its printed output into its page
between the markers

    <!-- recipe-output: NAME -->
    ...
    <!-- /recipe-output -->

so that the pages and the recipes cannot drift apart. Prose on the pages refers to the
quoted output instead of repeating its numbers.

Run from the repository root, with the recipes' extra installed:

    python docs/regenerate.py            # every recipe (a few minutes on 2 cores)
    python docs/regenerate.py laplace    # one or more by name
"""

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile


ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "pages"
# recipe -> (page, whether it draws a figure named after it)
RECIPES = {
    "rnn_curvature": ("recipes/rnn_curvature.md", True),
    "obd_pruning": ("recipes/obd_pruning.md", True),
    "diagonal_newton": ("recipes/diagonal_newton.md", True),
    "laplace": ("recipes/laplace.md", True),
    "quickstart": ("recipes/quickstart.md", False),
}
MARKER = re.compile(
    r"(<!-- recipe-output: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /recipe-output -->)", re.S
)


def quote(page: pathlib.Path, name: str, output: str) -> str:
    """`page`'s text with the block marked for `name` replaced by `output`."""
    text = page.read_text()
    found = [m for m in MARKER.finditer(text) if m.group("name") == name]
    if len(found) != 1:
        raise SystemExit(f"{page} needs exactly one `<!-- recipe-output: {name} -->` block")
    match = found[0]
    block = "```\n" + output.rstrip("\n") + "\n```\n"
    return text[: match.start("body")] + block + text[match.end("body") :]


def regenerate(name: str) -> None:
    page, has_figure = RECIPES[name]
    with tempfile.TemporaryDirectory() as directory:
        command = [sys.executable, str(ROOT / "recipes" / f"{name}.py")]
        if has_figure:
            command += ["--out", directory]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"recipe {name} failed")
        if has_figure:
            shutil.copy(pathlib.Path(directory) / f"{name}.png", PAGES / "figures" / f"{name}.png")
    output = "\n".join(
        line for line in done.stdout.splitlines() if not line.startswith("wrote ")
    )
    path = PAGES / page
    path.write_text(quote(path, name, output))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"recipes (default: all of {', '.join(RECIPES)})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; the recipes are {', '.join(RECIPES)}")
    for name in args.names or RECIPES:
        regenerate(name)


if __name__ == "__main__":
    main()
