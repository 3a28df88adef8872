"""The import direction manifolds <- spherical_cl <- trainers, checked on the source."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The command-line entry modules run the trainer, so they may import it.
ENTRY_MODULES = {"train.py", "ablate.py"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_manifolds_imports_nothing_from_the_project():
    for path in (REPO / "manifolds").rglob("*.py"):
        assert not imported_packages(path) & {"spherical_cl", "trainers"}, path


def test_library_does_not_import_trainers():
    for path in (REPO / "spherical_cl").rglob("*.py"):
        if path.name in ENTRY_MODULES and path.parent.name == "spherical_cl":
            continue
        assert "trainers" not in imported_packages(path), path
