"""The layering of docs/architecture.md holds: the import-linter contracts in pyproject.toml
are kept, and no two modules of the project import each other, directly or through others
(lazy and TYPE_CHECKING imports included: a lazy import that dodges a cycle is a cycle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = grimp.build_graph("tensorgate", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.is_module_squashed(imported) or imported == module:
                continue
            # A package's __init__ may import its own submodules: that is not a cycle.
            if module.startswith(imported + ".") or imported.startswith(module + "."):
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append(" -> ".join((module, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
