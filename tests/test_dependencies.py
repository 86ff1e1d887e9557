"""pyproject.toml bounds the libraries whose next major release may break wclust, and
constraints.txt (what ``make install`` installs) lies inside those bounds."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# Libraries a major release of which has broken (or would break) wclust: each needs an
# upper bound wherever pyproject.toml names it.
MUST_BE_BOUNDED = {
    "numpy",
    "numba",
    "safetensors",
    "constriction",
    "typer",
    "rich",
    "transformers",
    "huggingface-hub",
    "tokenizers",
    "jiwer",
    "gguf",
    "ruff",
    "ray",
}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("wclust")]
    return reqs


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one exact pin per line
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_major_releases_are_bounded():
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in MUST_BE_BOUNDED:
            assert any(s.operator in ("<", "<=", "==") for s in req.specifier), str(req)
    named = {canonicalize_name(r.name) for r in _requirements()}
    assert MUST_BE_BOUNDED <= named  # the list above names real dependencies


def test_constraints_satisfy_pyproject():
    pins = _constraints()
    assert "wclust" not in pins and "torch" not in pins  # torch: pinned in pyproject.toml
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    # every dependency of `.[all]` has a pin, so a fresh install repeats the tested set
    missing = {canonicalize_name(r.name) for r in _requirements()} - set(pins) - {"torch"}
    assert not missing, missing


def test_installed_versions_match_the_constraints():
    """Run in the project's venv: what the tests run with is what constraints.txt says."""
    checked = 0
    for name, pinned in _constraints().items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # e.g. a venv without the optional extras
        checked += 1
        assert have == pinned, f"{name}: installed {have}, constraints.txt {pinned}"
    if checked == 0:
        pytest.skip("none of the constrained packages is installed here")
