"""Row `gemm`: the machine's float32 matrix-multiply rate (GFLOP/s) for square products
and for batched products of `N` `(n, n)` by `(n, T n)` matrices, the shape of a
recurrent kernel's impulse-response update. Reported, no target."""

from ..gemm import batched_gemm_flops, batched_gemm_rate, gemm_rate
from ..options import Options
from ..timing import device_kind


ROWS = ("gemm",)
SUMMARY = {
    "gemm": "float32 GEMM rate (GFLOP/s), square and batched (n x n) @ (n x T n) shapes",
}
MIN_REPEATS = 20
_LABELS = {
    (128, 32, 16): "H = 128 cell, or an LSTM's 2H state at H = 64",
    (64, 25, 128): "H = 64 cell",
}


def measure(row: str, options: Options) -> dict:
    """Every square size and batched shape of `options`. Cost: about a second."""
    repeats = max(options.repeats, MIN_REPEATS)
    shapes = []
    for size in options.gemm_squares:
        shapes.append(
            {
                "kind": "square",
                "shape": f"({size} x {size}) @ ({size} x {size})",
                "flops": 2 * size**3,
                "gflops_per_s": gemm_rate(size, size, size, repeats=repeats, seed=options.seed),
                "note": "",
            }
        )
    for n, T, N in options.gemm_shapes:
        shapes.append(
            {
                "kind": "batched",
                "shape": f"{N} x ({n} x {n}) @ ({n} x {T * n})",
                "n": n,
                "T": T,
                "N": N,
                "flops": batched_gemm_flops(n, T, N),
                "gflops_per_s": batched_gemm_rate(n, T, N, repeats=repeats, seed=options.seed),
                "note": f"n = {n}, T = {T}, N = {N}"
                + (f": {_LABELS[(n, T, N)]}" if (n, T, N) in _LABELS else ""),
            }
        )
    return {
        "row": "gemm",
        "shapes": shapes,
        "repeats": repeats,
        "target": "(reported)",
        "target_met": None,
        "device": device_kind(),
    }


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The rate of every shape (the same in both trees unless the machine drifts)."""
    return [(shape["shape"], shape["gflops_per_s"], "GFLOP/s") for shape in result["shapes"]]
