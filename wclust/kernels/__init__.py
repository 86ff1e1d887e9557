"""CPU kernels on packed codes (numba, compiled on first use)."""
