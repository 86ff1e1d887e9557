"""CPU kernels on packed codes.

``ops``: the compiled kernels (``wclust/csrc``, built by ``pip install``) as torch
operators, what compressed modules run; they use torch's own thread pool, so no
second OpenMP pool competes with torch's and no environment variable is needed.
``lut`` and ``simd``: the numba kernels they replaced, kept as references for
``benchmarks/kernel_speed.py`` (numba is imported only there and at compress time).
"""
