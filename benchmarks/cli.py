"""The command line: `python -m benchmarks [--rows ...] [--ab REF] ...`."""

import argparse
import importlib
import json
import sys

from . import rows as rows_
from .ab import run_ab
from .formatting import format_ab, format_results
from .options import Options
from .trees import REPO_ROOT, run_worker


SUITES = {"gpu": ("research",)}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    shapes = []
    for part in text.split(","):
        try:
            shape = tuple(int(x) for x in part.strip().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise argparse.ArgumentTypeError(
                f"expected n x T x N triples like 128x32x16, got {part!r}"
            )
        shapes.append(shape)
    return tuple(shapes)


def _epilog() -> str:
    lines = ["rows:"]
    for row in rows_.ROWS:
        lines.append(f"  {row:<12} {rows_.summary(row)}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The argument parser (every option with its default in `--help`)."""
    defaults = Options()
    shapes = ",".join("x".join(map(str, shape)) for shape in defaults.gemm_shapes)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=importlib.import_module(__package__).__doc__,
        epilog=_epilog(),
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--rows",
        default=",".join(row for row in rows_.ROWS if row not in SUITES["gpu"]),
        help="comma-separated rows to measure, in order",
    )
    parser.add_argument(
        "--suite", choices=sorted(SUITES),
        help="a named set of rows instead of --rows: 'gpu' runs the kernels at research "
        "sizes (GRU/LSTM 256 units, T = 128; mlp2/CNN at batch 1024) and prints one table",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="the research sizes scaled down to a smoke run (seconds on a CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats,
        help="timed calls per kernel (median reported, after one warm-up call)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=defaults.rounds,
        help="rounds of the interleaved rows (overhead, ratios): each calls every compared "
        "function once",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of every model and batch"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write every row's figures to PATH as JSON"
    )
    parser.add_argument(
        "--ab", metavar="REF",
        help="A/B mode: measure each row on a temporary git worktree of commit REF and on "
        "the working tree, alternately, and print both medians and new/old",
    )  # fmt: skip
    parser.add_argument(
        "--ab-rounds", type=int, default=3,
        help="A/B mode: rounds per row; each round runs both sides, each in its own process",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-hidden", type=_ints, default=",".join(map(str, defaults.scaling_hidden)),
        help="scaling row: hidden sizes of the GRU grid",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-steps", type=_ints, default=",".join(map(str, defaults.scaling_steps)),
        help="scaling row: sequence lengths T of the GRU grid",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-basis", type=int, default=defaults.scaling_basis,
        help="scaling row: Hessian-vector products timed per cell to extrapolate the "
        "generic kernel",
    )  # fmt: skip
    parser.add_argument(
        "--scaling-cap", type=float, default=defaults.scaling_cap,
        help="scaling row: seconds; a cell predicted to take longer at the full batch is "
        "timed on fewer samples and scaled up",
    )  # fmt: skip
    parser.add_argument(
        "--gemm-squares", type=_ints, default=",".join(map(str, defaults.gemm_squares)),
        help="gemm row: sizes n of square (n x n) @ (n x n) products",
    )  # fmt: skip
    parser.add_argument(
        "--gemm-shapes", type=_shapes, default=shapes,
        help="gemm row: nxTxN triples of batched products, N of (n x n) @ (n x T n)",
    )  # fmt: skip
    return parser


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str], Options]:
    """`(arguments, rows, options)` from the command line; errors exit with a message
    that names the option."""
    p = parser()
    args = p.parse_args(argv)
    for name in ("repeats", "rounds", "ab_rounds", "scaling_basis"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.scaling_cap <= 0:
        p.error("--scaling-cap must be > 0")
    if args.suite:
        selected = list(SUITES[args.suite])
    else:
        selected = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in selected if row not in rows_.ROWS]
    if unknown or not selected:
        p.error(f"--rows: unknown rows {unknown}; rows are {', '.join(rows_.ROWS)}")
    options = Options(
        repeats=args.repeats,
        rounds=args.rounds,
        seed=args.seed,
        scaling_hidden=args.scaling_hidden,
        scaling_steps=args.scaling_steps,
        scaling_basis=args.scaling_basis,
        scaling_cap=args.scaling_cap,
        gemm_squares=args.gemm_squares,
        gemm_shapes=args.gemm_shapes,
        quick=args.quick,
    )
    return args, selected, options


def main(argv: list[str] | None = None):
    """Measure the selected rows, each in its own process, and print the tables (or,
    with `--ab`, the A/B table). Returns the figures written by `--json`."""
    args, selected, options = parse(argv)
    if args.ab:
        report = run_ab(args.ab, selected, options, args.ab_rounds)
        print(format_ab(report))
        output = report
    else:
        results = []
        for row in selected:
            print(f"measuring {row} ...", file=sys.stderr, flush=True)
            results.append(run_worker(row, options, REPO_ROOT, REPO_ROOT))
        print(format_results(results))
        output = results
    if args.json:
        with open(args.json, "w") as file:
            json.dump(output, file, indent=2)
    return output
