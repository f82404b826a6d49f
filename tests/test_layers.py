"""The packages' layers, read from the code: every import between top-level packages goes down.

storage <- engine <- alignment <- ui <- assistant (and `assistant` may import all of them). An
upward import (say `engine` importing `assistant`) would tie the replica work to the app; the
test names each one it finds, with file and line. Imports inside functions count too: they are
how heavy modules are deferred, not a way around the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what each package may import, besides itself
ALLOWED = {
    "storage": set(),
    "engine": {"storage"},
    "alignment": {"engine", "storage"},
    "ui": {"alignment", "storage"},
    "assistant": {"engine", "alignment", "storage", "ui"},
}


def package_imports() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> ['file:line', ...], for the five packages."""
    found: dict[str, dict[str, list[str]]] = {p: {} for p in ALLOWED}
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for top in _imported_tops(node):
                    if top in ALLOWED and top != package:
                        where = f"{path.relative_to(REPO)}:{node.lineno}"
                        found[package].setdefault(top, []).append(where)
    return found


def test_every_import_between_packages_goes_down_a_layer():
    found = package_imports()
    upward = {
        f"{package} -> {target}": places
        for package, targets in found.items()
        for target, places in targets.items()
        if target not in ALLOWED[package]
    }
    assert not upward, upward
    # the map as drawn from the code (printed with -s; docs/architecture.md has it in words)
    for package, targets in found.items():
        print(package, "->", ", ".join(sorted(targets)) or "nothing")


def test_the_engine_package_holds_what_talks_to_vllm():
    """Nothing outside `engine/` starts vLLM's server or speaks its routes (the replicas will
    live there)."""
    offenders = []
    for package in ("assistant", "alignment", "ui", "storage"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if "vllm.entrypoints" in text or "/collective_rpc" in text:
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_benchmarks_and_the_harness_need_no_test_suite():
    """The Docker image ships bench/ and harness/ but not tests/ (`make demo` runs there): no
    module of theirs may import `tests`."""
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for folder in ("bench", "harness")
        for path in (REPO / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if "tests" in _imported_tops(node)
    ]
    assert not offenders, offenders


def _imported_tops(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()
