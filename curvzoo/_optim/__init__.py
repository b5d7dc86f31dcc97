"""The curvature preconditioners of `curvzoo.optim`: optax transformations whose
curvature comes from `update`'s extra arguments or from curvzoo's diagonals."""
