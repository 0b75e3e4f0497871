"""Every package stitchcache imports is installed by `pip install -e .` (pyproject's dependencies and
what they require): a module that imports something only the test extra or a developer venv brings
(pandas, via ckatorch/seaborn, broke the tree report in a fresh-clone demo run) fails here."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def install_closure() -> set[str]:
    """Distributions `pip install -e .` installs: the declared dependencies and, recursively, their
    unconditional requirements (extras and environment-marked ones left out)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [_name(d) for d in deps], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if ";" not in r or "extra" not in r.split(";", 1)[1] and "python_version" in r]
    return seen


def imported_top_level() -> dict[str, str]:
    """Top-level module -> first file importing it, over every stitchcache module (absolute imports)."""
    found = {}
    for py in sorted((ROOT / "stitchcache").rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], str(py.relative_to(ROOT)))
    return found


def test_every_import_is_installed_by_the_package():
    closure = install_closure()
    dists = md.packages_distributions()
    optional = {"snakemake_executor_plugin_slurm", "ckatorch"}  # imported only where their extras are documented
    missing = []
    for mod, where in imported_top_level().items():
        if mod in sys.stdlib_module_names or mod == "stitchcache" or mod in optional:
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(mod, [])}
        if not owners & closure:
            missing.append(f"{mod} (imported in {where}; installed by {sorted(owners) or 'nothing here'})")
    assert not missing, "imported but not installed by `pip install -e .`: " + "; ".join(missing)
