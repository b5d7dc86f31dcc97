"""Curvature beyond the diagonal: the Hessian and the GGN as linear operators, their
extreme eigenpairs, their trace and their spectral density."""
