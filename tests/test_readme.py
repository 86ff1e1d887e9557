"""What README.md tells a user to run exists: every `wclust` command and option, every
``wclust.NAME(...)`` of the Python examples, every benchmarks/ script and make target."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main

import wclust
from wclust.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    """`wclust ...` command lines: bash code-block lines and inline code spans."""
    found = []
    in_bash = False
    for line in README.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh")
            continue
        if in_bash and line.startswith("wclust "):
            found.append(line.split("#")[0].strip())
    found += re.findall(r"`(wclust [a-z]+[^`]*)`", README)
    return found


def _options(command) -> set[str]:
    opts = {"--help"}
    for p in command.params:
        opts.update(o for o in [*p.opts, *p.secondary_opts] if o.startswith("-"))
    return opts


def test_readme_wclust_commands_use_real_commands_and_options():
    cli = typer.main.get_command(app)
    commands = _commands()
    assert len(commands) >= 10  # the parser still finds them
    for line in commands:
        words = shlex.split(line.replace("...", ""))
        sub = words[1]
        assert sub in cli.commands, f"README: `{line}`: no command {sub!r}"
        known = _options(cli.commands[sub])
        for w in words[2:]:
            opt = w.split("=")[0]
            if opt.startswith("--"):
                assert opt in known, f"README: `{line}`: `wclust {sub}` has no option {opt}"


def test_readme_python_names_exist():
    names = set(re.findall(r"\bwclust\.([A-Za-z_][A-Za-z0-9_]*)\(", README))
    assert {"compress_", "save", "load"} <= names
    missing = sorted(n for n in names if not hasattr(wclust, n))
    assert not missing, f"README calls wclust.{missing} which do not exist"


def test_readme_scripts_and_make_targets_exist():
    for script in set(re.findall(r"benchmarks/([A-Za-z0-9_]+\.py)", README)):
        assert (ROOT / "benchmarks" / script).is_file(), f"README names benchmarks/{script}"
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"\bmake ([a-z]+)\b", README)):
        assert re.search(rf"^{target}:", makefile, re.M), f"README names `make {target}`"
