"""curvzoo: Hessian diagonals and their curvature relatives for Equinox models."""

from importlib import metadata as _metadata

from . import analysis as analysis, losses as losses, optim as optim, structures as structures
from ._api._diagonal import diagonal as diagonal
from ._api._family import (
    empirical_fisher_diagonal as empirical_fisher_diagonal,
    fisher_diagonal as fisher_diagonal,
    ggn_diagonal as ggn_diagonal,
)
from ._api._hessian import hessian_diagonal as hessian_diagonal
from ._api._hutchinson import hutchinson_diagonal as hutchinson_diagonal
from ._api._plan import plan as plan
from ._api._time_steps import time_step_curvature as time_step_curvature
from ._dispatch._plan import Plan as Plan
from ._estimators import (
    AbstractEstimator as AbstractEstimator,
    EmpiricalFisher as EmpiricalFisher,
    Estimate as Estimate,
    Exact as Exact,
    Fisher as Fisher,
    GGN as GGN,
    Hutchinson as Hutchinson,
)
from ._models import (
    AbstractModel as AbstractModel,
    CNN as CNN,
    ElmanCell as ElmanCell,
    MLP as MLP,
    RNN as RNN,
)
from ._run._execute import SlowCurvatureWarning as SlowCurvatureWarning
from ._spectral._density import (
    spectral_density as spectral_density,
    SpectralDensity as SpectralDensity,
)
from ._spectral._eigenvalues import (
    Eigenpairs as Eigenpairs,
    hessian_eigenvalues as hessian_eigenvalues,
)
from ._spectral._operators import (
    ggn_operator as ggn_operator,
    hessian_operator as hessian_operator,
)
from ._spectral._trace import hessian_trace as hessian_trace, TraceEstimate as TraceEstimate


try:
    __version__ = _metadata.version("curvzoo")
except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"
