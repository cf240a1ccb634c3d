"""The import layers, read from the source (every import statement, at any depth, with ast):
the foundation stages import no other stage, and nothing in the package imports the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medtl"
STAGES = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} | {"pipeline"}
# Stages (and the config) that every other stage may build on: they import no stage but their own.
FOUNDATION = {"metrics": "metrics", "calibrate": "calibrate", "io": "io", "config.py": None, "config_errors.py": None}


def _imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """The ``medtl.*`` modules ``path`` (a file under ``root``) imports, relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found.update([base] if base != "medtl" else [f"medtl.{alias.name}" for alias in node.names])
    return {name for name in found if name == "medtl" or name.startswith("medtl.")}


def _files(entry: str) -> list[Path]:
    path = PACKAGE / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _stage(module: str) -> str | None:
    part = module.split(".")[1] if "." in module else None
    return part if part in STAGES else None


def test_the_stages_are_found():
    assert {"io", "metrics", "calibrate", "backbones", "train", "cli", "bundle", "pipeline"} <= STAGES


@pytest.mark.parametrize("entry", sorted(FOUNDATION))
def test_foundation_imports_no_other_stage(entry):
    own = FOUNDATION[entry]
    wrong = {f"{path.relative_to(PACKAGE)}: {module}" for path in _files(entry) for module in _imported(path)
             if _stage(module) not in (None, own)}
    assert not wrong, f"{entry} imports other stages: {sorted(wrong)}"


def test_nothing_imports_the_cli():
    wrong = {f"{path.relative_to(PACKAGE)}: {module}" for path in PACKAGE.rglob("*.py")
             if path.parent.name != "cli" and path.name != "__main__.py"
             for module in _imported(path) if _stage(module) == "cli"}
    assert not wrong, f"only medtl/__main__.py may import medtl.cli: {sorted(wrong)}"


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    probe = tmp_path / "medtl" / "metrics" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import numpy\n\ndef f():\n    from medtl.train import Trainer\n    from ..io import ScanRecord\n"
                     "    from . import bootstrap\n    from medtl import report\n")
    assert _imported(probe, tmp_path) == {"medtl.train", "medtl.io", "medtl.metrics", "medtl.report"}
