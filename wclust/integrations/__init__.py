"""Integrations with other libraries, each imported only when that library is used.

``install_transformers_hook`` (called by ``import wclust``) makes transformers find the
wclust quantizer without ``import wclust`` importing transformers: the registration
runs right after transformers imports its quantizer table, or at once when transformers
is already imported. A folder saved with ``save_pretrained`` then reloads with a plain
``from_pretrained`` in any process that imported wclust.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

__all__ = ["install_transformers_hook"]

# The module holding transformers' quantization config and quantizer tables.
_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    from . import transformers as _hf  # noqa: F401 - registers on import


class _AfterImport(importlib.abc.Loader):
    """Runs the real loader, then the registration."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            _register()
        except Exception as e:  # noqa: BLE001 - never break the user's transformers import
            logging.getLogger("wclust").info("wclust quantizer not registered: %s", e)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.quantizers.auto`` (and of nothing else)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterImport(spec.loader)
        return spec


def install_transformers_hook() -> None:
    """Register the wclust quantizer with transformers now if its quantizer table is
    imported, else as soon as it is (once; importing wclust twice is harmless)."""
    if _TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
