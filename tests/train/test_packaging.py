"""pyproject.toml declares every third-party package that bat_jax imports directly (none only through
another package's dependencies)."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 name normalisation


def _declared() -> set[str]:
    """Distribution names of [project] dependencies and optional-dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"].values()
    specs = [*project["dependencies"], *(spec for group in optional for spec in group)]
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in specs}


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module → first file of bat_jax/ that imports it (absolute imports, not stdlib)."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "bat_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], f"{path.relative_to(REPO)}:{node.lineno}")
    return {m: where for m, where in found.items() if m not in sys.stdlib_module_names and m != "bat_jax"}


def test_every_directly_imported_package_is_declared():
    declared, distributions = _declared(), packages_distributions()
    undeclared = {
        module: (where, distributions.get(module))
        for module, where in _imported_top_level_modules().items()
        if not declared & {_canonical(d) for d in distributions.get(module, [module])}
    }
    assert not undeclared, f"pyproject.toml: expected every import declared, found undeclared {undeclared}"
