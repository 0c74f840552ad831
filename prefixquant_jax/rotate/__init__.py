"""Rotations: Hadamard matrices and transforms, norm folding, R1/R2 fusion, online R3/R4."""
