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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
