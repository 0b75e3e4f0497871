"""One-way arrows: the core libraries never import the stages that use them (also not lazily)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "stitchcache"


def imported(module: str) -> set[str]:
    """Every stitchcache module ``module`` imports, at top level or inside functions."""
    path = PKG / (module.replace(".", "/") + ".py")
    pkg = ["stitchcache"] + module.split(".")[:-1]  # the package relative imports start from
    if not path.exists():
        path = PKG / module.replace(".", "/") / "__init__.py"
        pkg = ["stitchcache"] + module.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n[len("stitchcache."):] for n in out if n.startswith("stitchcache.")}


@pytest.mark.parametrize("module, forbidden", [
    ("tasks", "stitch"),         # heads, losses, metrics: used by stitch/, never using it
    ("train", "stitch"),         # the fit loop knows no stitch layer and no stage
    ("train", "cli"),
    ("provenance", "stitch"),
    ("backends.weights", "stitch"),
])
def test_no_arrow_back(module, forbidden):
    bad = sorted(n for n in imported(module) if n == forbidden or n.startswith(forbidden + "."))
    assert not bad, f"stitchcache.{module} imports {bad}"


def test_the_checker_sees_imports():
    assert "tasks" in imported("stitch.model") or "tasks.Head" in imported("stitch.model")
    assert any(n.startswith("train") for n in imported("stitch.trainer"))
