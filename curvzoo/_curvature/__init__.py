from ._api import (
    empirical_fisher_diagonal as empirical_fisher_diagonal,
    fisher_diagonal as fisher_diagonal,
    ggn_diagonal as ggn_diagonal,
    hessian_diagonal as hessian_diagonal,
    hutchinson_diagonal as hutchinson_diagonal,
)
