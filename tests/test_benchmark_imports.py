"""Every name a benchmark script (or example) imports from peft_export exists.

The scripts are run by hand, not by the suite, and import inside functions so that each case's
process loads only what it needs; a renamed function then breaks a benchmark only when someone runs
it (bench_sam2_propagation.py imported a removed ``sam2_base_info`` and stopped before its first
case). This reads each script's imports (at any depth) and resolves them, without running it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")])


def peft_export_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from peft_export... import name`` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("peft_export"):
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_sam2_propagation.py", "bench_volume.py", "bench_improve.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_imported_name_exists(script: Path):
    missing = []
    for module, name, line in peft_export_imports(script):
        mod = importlib.import_module(module)
        if name != "*" and not hasattr(mod, name):
            try:  # a submodule imported by name
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{script.name}:{line}: {module}.{name}")
    assert not missing, "names the script imports that do not exist:\n" + "\n".join(missing)
