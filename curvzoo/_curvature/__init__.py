from ._api import hessian_diagonal as hessian_diagonal
