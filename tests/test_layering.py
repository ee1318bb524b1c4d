"""megakv's packages import downward only (DESIGN.md, "Roles, reading downward"): no package reaches one above it.

Read from the source, every import statement at any depth (a function's lazy import is an import too).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import megakv

PACKAGE_ROOT = Path(megakv.__file__).parent
# Every folder of modules (megakv.kernels has no __init__.py: setup.py names it).
PACKAGES = sorted(path.name for path in PACKAGE_ROOT.iterdir() if path.is_dir() and any(path.glob("*.py")))

# Package -> the megakv packages it may import. Entry points (server, bench, the top-level modules) may
# import anything below them, so they are not listed.
ALLOWED = {
    "kernels": set(),
    "parallel": {"kernels"},
    "checkpoint": set(),
    "kvcache": set(),
    "attention": {"kernels"},
    "models": {"attention", "kernels", "kvcache", "parallel"},
    "engine": {"attention", "checkpoint", "kernels", "kvcache", "models", "parallel"},
    "distkv": {"attention", "checkpoint", "engine", "kernels", "kvcache", "models", "parallel"},
}


def imported_packages(package: str) -> dict[str, list[str]]:
    """megakv package -> the modules of ``package`` that import it."""
    importers: dict[str, list[str]] = {}
    for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "megakv" and len(parts) > 1 and parts[1] in PACKAGES and parts[1] != package:
                    importers.setdefault(parts[1], []).append(path.relative_to(PACKAGE_ROOT).as_posix())
    return importers


def test_layering_every_package_is_listed():
    assert set(ALLOWED) <= set(PACKAGES)
    assert set(PACKAGES) - set(ALLOWED) == {"bench", "server"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layering_package_imports_only_the_layers_below(package):
    # Top-level modules (megakv.config, megakv.processes, ...) are leaves every layer may read.
    upward = {imported: modules for imported, modules in imported_packages(package).items()
              if imported not in ALLOWED[package]}
    assert upward == {}, f"megakv.{package} imports packages above it: {upward}"
