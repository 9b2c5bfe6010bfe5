"""The package's layout rules, checked on the import graph: the trainer uses grace_kernels' public API only,
and every command-line parser lives in grace/cli/."""

import ast
import pathlib

import pytest

GRACE = pathlib.Path(__file__).resolve().parents[1] / "grace"
MODULES = sorted(GRACE.rglob("*.py"))


def _imports(path: pathlib.Path) -> list[str]:
    """Every module name ``path`` imports (``from a.b import c`` gives a.b and a.b.c)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_the_walk_sees_the_packages():
    rel = {p.relative_to(GRACE).as_posix() for p in MODULES}
    assert {"cli/__init__.py", "cli/train.py", "data/index.py", "demo/run.py", "io.py", "naming.py"} <= rel


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(GRACE).as_posix())
def test_grace_uses_only_the_public_api_of_grace_kernels(path):
    private = [n for n in _imports(path)
               if n.split(".")[0] == "grace_kernels" and any(part.startswith("_") for part in n.split(".")[1:])]
    assert private == [], f"{path.name} reaches into private grace_kernels modules: {private}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(GRACE).as_posix())
def test_argument_parsers_live_in_grace_cli(path):
    if path.parent.name == "cli":
        return
    assert "argparse" not in _imports(path), f"{path.name} builds a parser: move it to grace/cli/"
