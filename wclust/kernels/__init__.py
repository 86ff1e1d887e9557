"""CPU kernels on packed codes (numba, compiled on first use)."""

# Compressed layers run numba kernels between torch ops, and the two keep separate
# OpenMP thread pools on the same cores. libgomp's default spins a waiting thread
# for 300,000 rounds, so each pool's idle threads steal the cores the other is
# working on (4-bit Whisper tiny.en: 16.5 s per clip instead of 2.7); passive
# waiting (no spin) costs ~50 us to wake the numba threads on every small matvec.
# A short spin keeps back-to-back kernel calls warm without the fight (measured in
# docs/experiments, LUT kernel log: faster 4-bit Whisper decoding, fp32 unchanged).
SPIN_ENV = {"GOMP_SPINCOUNT": "10000"}


def openmp_env_defaults(environ) -> dict:
    """Environment variables to add before torch and numba load OpenMP: the
    short spin, unless the user chose a wait policy or spin count."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return dict(SPIN_ENV)
