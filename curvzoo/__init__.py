"""curvzoo: Hessian diagonals and their curvature relatives for Equinox models."""

from importlib import metadata as _metadata

from . import analysis as analysis, losses as losses, optim as optim
from ._api._functions import (
    empirical_fisher_diagonal as empirical_fisher_diagonal,
    fisher_diagonal as fisher_diagonal,
    ggn_diagonal as ggn_diagonal,
    hessian_diagonal as hessian_diagonal,
    hutchinson_diagonal as hutchinson_diagonal,
)
from ._models import (
    AbstractModel as AbstractModel,
    CNN as CNN,
    ElmanCell as ElmanCell,
    MLP as MLP,
    RNN as RNN,
)


try:
    __version__ = _metadata.version("curvzoo")
except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"
