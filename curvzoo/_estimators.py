"""What a diagonal is an estimate of, as objects: `Exact`, `GGN`, `EmpiricalFisher`,
`Fisher` and `Hutchinson`, each passed to [`curvzoo.diagonal`][] and [`curvzoo.plan`][]
(as lineax takes `solver=lx.CG(...)`), and `Estimate`, a random estimate with its
standard error.

An estimator is a small frozen Equinox module: its fields are its settings (checked
when it is built), and its class says what it computes (`title`), which loss it needs
(`needs_per_sample_form`: a curvzoo loss, for the GGN family), whether it draws
(`random`: it then needs `key=`) and which options of `curvzoo.diagonal` apply to it.
Estimators are hashable and compare by value, so a plan computed for one is found again
for an equal one.
"""

from typing import Any, ClassVar

import equinox as eqx
from jaxtyping import PyTree

from ._run._checks import check_positive_int


class AbstractEstimator(eqx.Module):
    """The base of curvzoo's estimators of a curvature diagonal.

    **Class attributes** (what the pipeline reads; a subclass sets them):

    - `quantity`: the pipeline's key for what is computed (`"hessian"`, `"ggn"`,
        `"empirical_fisher"`, `"fisher"`, `"hutchinson"`).
    - `title`: what the result is, for plans and messages.
    - `function`: the function of the older interface that computes it.
    - `random`: whether it draws (and so needs `key=`).
    - `needs_per_sample_form`: whether `loss` must be a curvzoo loss.
    - `has_method`, `has_per_sample`, `has_stderr`: whether `method=` (a structured
        kernel against a general one), `per_sample=True` and `return_stderr=True` apply.
    """

    quantity: ClassVar[str]
    title: ClassVar[str]
    function: ClassVar[str]
    random: ClassVar[bool] = False
    needs_per_sample_form: ClassVar[bool] = False
    has_method: ClassVar[bool] = True
    has_per_sample: ClassVar[bool] = True
    has_stderr: ClassVar[bool] = False

    @property
    def num_samples(self) -> int:
        """Targets drawn per sample (the Fisher's setting; 1 for the others)."""
        return 1

    @property
    def num_probes(self) -> int:
        """Probes averaged (Hutchinson's setting; 1 for the others)."""
        return 1

    @property
    def subtracts_ggn(self) -> bool:
        """Whether the exact GGN diagonal is a control variate (Hutchinson's)."""
        return False


class Exact(AbstractEstimator):
    """The exact diagonal of the Hessian of `loss(model, batch)`
    ([`curvzoo.hessian_diagonal`][]): any Equinox module and any loss, on the structured
    kernels where the model and loss have one, else one Hessian-vector product per
    trained parameter."""

    quantity: ClassVar[str] = "hessian"
    title: ClassVar[str] = "Hessian diagonal"
    function: ClassVar[str] = "`hessian_diagonal`"


class GGN(AbstractEstimator):
    """The exact diagonal of the generalised Gauss-Newton matrix
    `scale * sum_n J_n^T H_n J_n` (Schraudolph 2002; [`curvzoo.ggn_diagonal`][]):
    positive semi-definite for the curvzoo losses, which it needs (their per-sample
    form)."""

    quantity: ClassVar[str] = "ggn"
    title: ClassVar[str] = "GGN diagonal"
    function: ClassVar[str] = "`ggn_diagonal`"
    needs_per_sample_form: ClassVar[bool] = True


class EmpiricalFisher(AbstractEstimator):
    """The empirical Fisher's diagonal `scale * sum_n g_n^2`, the squared per-sample
    gradients at the batch's own targets ([`curvzoo.empirical_fisher_diagonal`][];
    Kunstner, Balles and Hennig 2019 on how it differs from the Fisher)."""

    quantity: ClassVar[str] = "empirical_fisher"
    title: ClassVar[str] = "empirical Fisher diagonal"
    function: ClassVar[str] = "`empirical_fisher_diagonal`"
    needs_per_sample_form: ClassVar[bool] = True


class Fisher(AbstractEstimator):
    """A Monte-Carlo estimate of the Fisher's diagonal: `num_samples` targets drawn per
    sample from the model's predictive distribution, and their squared gradients
    averaged ([`curvzoo.fisher_diagonal`][]). Unbiased for the GGN diagonal with the
    curvzoo losses; needs `key=`.

    **Fields:** `num_samples`, targets drawn per sample (a positive integer, default 1).
    """

    num_samples: int = 1

    quantity: ClassVar[str] = "fisher"
    title: ClassVar[str] = "Monte-Carlo Fisher diagonal"
    function: ClassVar[str] = "`fisher_diagonal`"
    random: ClassVar[bool] = True
    needs_per_sample_form: ClassVar[bool] = True
    has_per_sample: ClassVar[bool] = False

    def __check_init__(self):
        check_positive_int(self.num_samples, "num_samples")


class Hutchinson(AbstractEstimator):
    """Hutchinson's unbiased estimate of the Hessian diagonal, `mean(z * (H z))` over
    Rademacher probes `z` (Bekas, Kokiopoulou and Saad 2007;
    [`curvzoo.hutchinson_diagonal`][]); needs `key=`.

    **Fields:**

    - `num_probes`: probes averaged (a positive integer, default 16; at least 2 to ask
        for the standard error).
    - `control_variate`: `None` (default), or `GGN()`: the probes then estimate
        `diag(H - G)` and the exact GGN diagonal is added back (unbiased still, with
        less variance where the Hessian is close to the GGN; needs a curvzoo loss).
    """

    num_probes: int = 16
    control_variate: GGN | None = None

    quantity: ClassVar[str] = "hutchinson"
    title: ClassVar[str] = "Hutchinson estimate of the Hessian diagonal"
    function: ClassVar[str] = "`hutchinson_diagonal`"
    random: ClassVar[bool] = True
    has_method: ClassVar[bool] = False
    has_per_sample: ClassVar[bool] = False
    has_stderr: ClassVar[bool] = True

    def __check_init__(self):
        check_positive_int(self.num_probes, "num_probes")
        if self.control_variate is not None and not isinstance(self.control_variate, GGN):
            hint = " (the string 'ggn' is `control_variate=curvzoo.GGN()` here)"
            raise TypeError(
                "`control_variate` must be None or `curvzoo.GGN()`, got "
                f"{self.control_variate!r}" + (hint if self.control_variate == "ggn" else "") + "."
            )

    @property
    def needs_per_sample_form(self) -> bool:  # the control variate's GGN needs it
        return self.control_variate is not None

    @property
    def subtracts_ggn(self) -> bool:
        return self.control_variate is not None


ESTIMATORS = (Exact, GGN, EmpiricalFisher, Fisher, Hutchinson)
BY_QUANTITY = {cls.quantity: cls for cls in ESTIMATORS}


def from_names(
    quantity: str, *, num_samples: Any = 1, num_probes: Any = 1, control_variate: Any = None
) -> AbstractEstimator:
    """The estimator that the older, string-valued arguments name (`curvzoo.plan`'s
    `quantity=`, `hutchinson_diagonal`'s `control_variate="ggn"`, Sophia's names),
    each setting checked with an error that names it (before the fields' annotations
    are type-checked)."""
    if quantity not in BY_QUANTITY:
        raise ValueError(f"`quantity` must be one of {tuple(BY_QUANTITY)}, got {quantity!r}.")
    if quantity == "fisher":
        check_positive_int(num_samples, "num_samples")
        return Fisher(num_samples)
    if quantity == "hutchinson":
        check_positive_int(num_probes, "num_probes")
        if control_variate not in (None, "ggn"):
            raise ValueError(f"`control_variate` must be None or 'ggn', got {control_variate!r}.")
        return Hutchinson(num_probes, None if control_variate is None else GGN())
    return BY_QUANTITY[quantity]()


def check_estimator(estimator: Any) -> AbstractEstimator:
    """`estimator` if it is an estimator object, else a `TypeError` that says which to
    pass (for a class, a string of the older interface, or anything else)."""
    if isinstance(estimator, AbstractEstimator):
        return estimator
    names = ", ".join(f"`curvzoo.{cls.__name__}()`" for cls in ESTIMATORS)
    if isinstance(estimator, type) and issubclass(estimator, AbstractEstimator):
        raise TypeError(
            f"`estimator` must be an estimator object, got the class {estimator.__name__}; "
            f"pass an instance such as `curvzoo.{estimator.__name__}()`."
        )
    if isinstance(estimator, str) and estimator in BY_QUANTITY:
        cls = BY_QUANTITY[estimator]
        raise TypeError(
            f"`estimator` must be an estimator object, got the string {estimator!r}; pass "
            f"`curvzoo.{cls.__name__}()`."
        )
    raise TypeError(f"`estimator` must be one of {names}, got {estimator!r}.")


class Estimate(eqx.Module):
    """A random estimate with its standard error, two PyTrees shaped alike (a PyTree
    itself: `jax.tree.map` reaches both). Unpacks and indexes as a pair,
    `value, stderr = estimate`.

    **Fields:**

    - `value`: the estimate, shaped like the diagonal (`None` at frozen leaves).
    - `stderr`: the standard error of each entry: the sample standard deviation over the
        independent draws divided by the square root of their number.
    """

    value: PyTree
    stderr: PyTree

    def __iter__(self):
        yield self.value
        yield self.stderr

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> PyTree:
        """`estimate[0]` is `value`, `estimate[1]` `stderr`, as for the pair that
        `hutchinson_diagonal(..., return_stderr=True)` returned before."""
        return (self.value, self.stderr)[index]
