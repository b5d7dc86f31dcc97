"""curvzoo: Hessian diagonals and their curvature relatives for Equinox models."""

import importlib.metadata

from . import losses as losses
from ._curvature import hessian_diagonal as hessian_diagonal
from ._models import (
    AbstractModel as AbstractModel,
    CNN as CNN,
    ElmanCell as ElmanCell,
    MLP as MLP,
    RNN as RNN,
)


try:
    __version__ = importlib.metadata.version("curvzoo")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"
