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
    python docs/regenerate.py laplace    # one or more by marker name
"""

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple


ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "pages"


class Run(NamedTuple):
    """One run of a recipe whose output a page quotes."""

    script: str  # recipes/<script>.py
    args: tuple[str, ...]  # its command-line arguments (besides `--out`)
    page: str  # under docs/pages/
    figure: str | None  # the figure it draws, `<figure>.png` in `--out`


# marker name -> run: every recipe at least once, with its defaults
RECIPES = {
    "rnn_curvature": Run("rnn_curvature", (), "recipes/rnn_curvature.md", "rnn_curvature"),
    "rnn_curvature_lm": Run(
        "rnn_curvature", ("--task", "lm"), "recipes/rnn_curvature.md", "rnn_curvature_lm"
    ),
    "obd_pruning": Run("obd_pruning", (), "recipes/obd_pruning.md", "obd_pruning"),
    "diagonal_newton": Run("diagonal_newton", (), "recipes/diagonal_newton.md", "diagonal_newton"),
    "laplace": Run("laplace", (), "recipes/laplace.md", "laplace"),
    "quickstart": Run("quickstart", (), "recipes/quickstart.md", None),
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
    run = RECIPES[name]
    with tempfile.TemporaryDirectory() as directory:
        command = [sys.executable, str(ROOT / "recipes" / f"{run.script}.py"), *run.args]
        if run.figure is not None:
            command += ["--out", directory]
        print(f"running {' '.join(command[1:])} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"recipe {name} failed")
        if run.figure is not None:
            figure = pathlib.Path(directory) / f"{run.figure}.png"
            shutil.copy(figure, PAGES / "figures" / f"{run.figure}.png")
    output = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("wrote "))
    path = PAGES / run.page
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
