"""`curvzoo.hessian_diagonal`."""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
from jax.sharding import Mesh
from jaxtyping import PyTree

from .._estimators import Exact
from ._diagonal import diagonal


_EXACT = Exact()  # built once: a module's construction costs about 10 us per call


@no_type_check
def hessian_diagonal(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    args: PyTree | None = None,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
    per_sample: bool = False,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree:
    """The exact diagonal of the Hessian of `loss(model, batch)` with respect to the
    trainable parameters of `model`: [`curvzoo.diagonal`][] with `curvzoo.Exact()`.

    **Arguments:**

    - `model`: any Equinox module (a zoo model or your own). It is not modified.
    - `loss`: a curvzoo loss such as `curvzoo.losses.cross_entropy`, or any callable
        `loss(model, batch) -> scalar`, traced at every call (what it closes over is
        read as it stands then; a fresh lambda computing the same thing reuses the
        compiled kernel).
    - `batch`: a PyTree of arrays sharing a leading batch axis `N`; for curvzoo losses a
        pair `(inputs, targets)`, or a triple `(inputs, targets, lengths)` for sequences
        of different lengths (`curvzoo.losses`).
    - `filter_spec`: which leaves are trained, as in `equinox.partition`: a callable on
        leaves (default `equinox.is_inexact_array`) or a PyTree of bools that is a prefix
        of `model`. Only floating-point arrays are differentiated.
    - `chunk_size`: how much work is batched together with `jax.vmap`: basis vectors
        for the generic kernel, samples for the structured one. `None` (default) picks
        the largest chunk that fits `memory_budget`.
    - `memory_budget`: bytes for the per-chunk working set when `chunk_size=None`;
        default 128 MiB. The chunk's working set stays within it whenever one basis
        vector's (or sample's) does; beyond that the generic kernel holds the
        linearisation of one gradient (a few copies of the batch's activations) and the
        length-`P` result, and never a `P x P` matrix.
    - `method`: `"auto"` (default) takes the structured kernel where the model and the
        loss support it (for a recurrent network, where its estimated cost is also the
        lower one) and the generic kernel otherwise; `"structured"` forces the
        structured kernel and raises a `ValueError` naming the unsupported part;
        `"generic"` forces the reference kernel. Both are exact.
    - `per_sample`: if `True`, one diagonal per sample instead: sample `n`'s is the
        Hessian diagonal of `loss(model, batch_n)`, with `batch_n` the batch of that
        sample alone. For a curvzoo loss the batch's diagonal is then their sum
        (`reduction="sum"`) or, for `"mean"`, their mean, weighted by length where a
        batch `(inputs, targets, lengths)` has per-step targets: sample `n` weighs
        `lengths[n] / sum(lengths)`, as the loss is the mean over all valid steps.
    - `check_finite`: if `True` (default), raise a `ValueError` naming the leaf when
        `model` or `batch` holds NaN or inf, or when the result does (the loss or its
        derivatives overflow). Input `jax.Array`s once found finite are remembered
        (NumPy arrays, which can change, are checked at every call); the result's flag
        is computed with it, in the same compiled program (one pass over it, one
        boolean to the host). Under an outer `jax.jit` the values are not known and
        nothing is checked.
    - `mesh`: a `jax.sharding.Mesh` to run on several devices. The model is
        replicated. Kernels that work sample by sample (structured, GGN family,
        per-sample) split the batch along its leading axis over all of the mesh's
        devices (its size must divide evenly), so every device handles its share of
        the samples; the generic kernel and Hutchinson instead split each chunk of
        basis vectors or probes over the devices, each of which sees the whole batch.
        XLA (GSPMD) partitions the work. Leaves already placed on `mesh` keep their
        sharding. For several hosts, call
        `jax.distributed.initialize()` first and pass a mesh over `jax.devices()` and
        a batch of global arrays (`jax.make_array_from_process_local_data`).
    - `progress`: if `True`, print a progress line to standard error while the kernel
        runs (chunks or entries done, rate, time left), from inside the compiled loop
        with `jax.debug.callback`. Off by default; it changes nothing in the result, and
        with `False` the compiled code has no callback at all.

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`, as
    `equinox.filter_grad` returns: at each trained leaf an array of that leaf's shape
    and dtype holding the diagonal of the Hessian for that leaf's entries; `None` at
    frozen leaves and at leaves that are not floating-point arrays. With
    `per_sample=True` every array gains a leading axis of size `N`.

    **Precision:** each result leaf has its parameter's dtype. The structured kernels
    compute each sample's terms in the model's precision and sum over samples and chunks
    in at least float32; the generic kernel computes each Hessian-vector product, the
    loss's own mean over the batch included, in the model's precision. For a bfloat16
    model expect about 3 significant digits (relative errors of 1e-3 to 4e-3 measured
    against float64 of the same weights, up to 2e-2 on the generic kernel), for float16
    about 4 (2e-4 to 7e-4).

    **Cost:** the generic kernel (any Equinox module, any loss) takes one
    Hessian-vector product per trained parameter, `P` in all, batched in chunks; never a
    `P x P` matrix. The structured kernel for zoo `MLP` and `CNN` with a curvzoo loss
    backpropagates the loss Hessian's factor (`C - 1` columns for cross-entropy over `C`
    classes) and the activations' diagonal residuals layer by layer: about `C` extra
    backward passes for a two-hidden-layer MLP, plus full Jacobian products for
    residuals two or more dense layers up. For the zoo `RNN` (Elman, GRU, LSTM; either
    readout) it works with the same-unit blocks of the Hessian with respect to per-step
    state perturbations, the state Jacobians and the BPTT adjoints: about `T^2 H^3`
    work per sample for `T` steps and `H` units, against `T H^4` for the generic
    kernel. With `per_sample=True` the structured kernels cost the same and the generic
    kernel takes `P` products per sample, each on one sample; the result holds `N P`
    numbers.

    **Example:**

    ```python
    model = curvzoo.MLP(4, 3, width_size=8, depth=1, key=jax.random.key(0))
    diag = curvzoo.hessian_diagonal(model, curvzoo.losses.cross_entropy, (x, labels))
    diag.layers[0].weight.shape  # (8, 4)
    ```
    """

    return diagonal(
        model, loss, batch, _EXACT, args=args, filter_spec=filter_spec,
        chunk_size=chunk_size, memory_budget=memory_budget, method=method,
        per_sample=per_sample, check_finite=check_finite, mesh=mesh, progress=progress,
    )  # fmt: skip
