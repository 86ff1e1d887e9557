"""Process setup shared by the command line and the measuring worker processes."""

from __future__ import annotations

__all__ = ["quiet_third_party"]


def quiet_third_party() -> None:
    """torchao (imported by transformers when installed) and torch log warnings about
    optional GPU libraries at import; they are noise on a CPU machine."""
    import logging
    import os

    for name in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Before torch loads OpenMP: a short spin (see wclust/kernels/__init__.py).
    from .kernels import openmp_env_defaults

    os.environ.update(openmp_env_defaults(os.environ))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
