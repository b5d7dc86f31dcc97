"""The settings every row reads, passed from the command line to the worker processes."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of one benchmark run (the command line's options; see `--help`).

    - `repeats`: timed calls per kernel in a row (median reported), after one warm-up.
    - `rounds`: rounds of the interleaved rows (`overhead`, `ratios`): each round calls
      every compared function once.
    - `seed`: seed of every model and batch.
    - `scaling_hidden`, `scaling_steps`: the `scaling` grid.
    - `scaling_basis`: Hessian-vector products timed per grid cell for the generic
      kernel's extrapolation.
    - `scaling_cap`: seconds; a grid cell whose predicted time at the full batch exceeds
      it is timed on a smaller batch and scaled up (per-sample cost is constant).
    - `gemm_squares`: sizes `n` of the square `(n, n) @ (n, n)` products in the `gemm` row.
    - `gemm_shapes`: `(n, T, N)` triples of the batched GEMM in the `gemm` row.
    - `quick`: the `research` row at small sizes (a smoke run of the GPU suite on a CPU).
    """

    repeats: int = 7
    rounds: int = 200
    seed: int = 0
    scaling_hidden: tuple[int, ...] = (32, 64, 128, 256)
    scaling_steps: tuple[int, ...] = (8, 16, 32, 64, 128)
    scaling_basis: int = 256
    scaling_cap: float = 20.0
    gemm_squares: tuple[int, ...] = (256, 512, 1024)
    gemm_shapes: tuple[tuple[int, int, int], ...] = ((128, 32, 16), (64, 25, 128))
    quick: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Options":
        fields = dict(data)
        for name in ("scaling_hidden", "scaling_steps", "gemm_squares"):
            fields[name] = tuple(fields[name])
        fields["gemm_shapes"] = tuple(tuple(shape) for shape in fields["gemm_shapes"])
        return cls(**fields)
