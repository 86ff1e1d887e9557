"""No code path in the wclust package unpickles or evaluates input.

Scans the package source (AST, not text) for: pickle/cPickle/dill/joblib/marshal/
shelve loads, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with
``allow_pickle`` not literally False, ``yaml.load`` / ``yaml.unsafe_load``, and the
builtins ``eval`` and ``exec``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wclust

PACKAGE = Path(wclust.__file__).parent
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
BUILTINS = {"eval", "exec"}  # importing by a constant name is not evaluating input


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
        if k.arg is None:  # **kwargs: cannot prove anything
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Each unsafe load/eval in ``source`` as 'file:line: what'."""
    tree = ast.parse(source, filename)
    found = []
    aliases: dict[str, str] = {}  # local name -> module.function it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        mod, _, fn = full.rpartition(".")
        where = f"{filename}:{node.lineno}: {full}"
        if mod.split(".")[0] in UNPICKLERS and fn in {"load", "loads", "open", "Unpickler"}:
            found.append(where)
        elif full == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            found.append(f"{where} without weights_only=True")
        elif full in {"numpy.load", "np.load"}:
            allow = _kw(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                found.append(f"{where} with allow_pickle")
        elif full in {"yaml.load", "yaml.unsafe_load", "yaml.load_all"}:
            found.append(where)
        elif isinstance(node.func, ast.Name) and node.func.id in BUILTINS and head not in aliases:
            found.append(where)
    return found


def test_package_never_unpickles_or_evaluates():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan really covers the package
    found = [hit for f in files for hit in unsafe_calls(f.read_text(), str(f.relative_to(PACKAGE)))]
    assert not found, "unsafe loads in wclust:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(f)",
        "import pickle as p\np.loads(b)",
        "from pickle import loads\nloads(b)",
        "import torch\ntorch.load(f)",
        "import torch\ntorch.load(f, weights_only=False)",
        "import torch\ntorch.load(f, **kw)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import numpy\nnumpy.load(f, allow_pickle=flag)",
        "import yaml\nyaml.load(s)",
        "eval(text)",
        "exec(code)",
        "import joblib\njoblib.load(p)",
    ],
)
def test_scanner_catches(snippet):
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(f, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=False)",
        "model.eval()",
        "import json\njson.loads(s)",
    ],
)
def test_scanner_allows(snippet):
    assert not unsafe_calls(snippet), snippet
