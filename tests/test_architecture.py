"""The import graph: dependencies run one way between the project's packages, and no module cycle exists.

core <- upstream, downstream <- s3prl <- recipes <- cli; only adaltm_s3prl imports s3prl (the libraries implement
s3prl's interfaces by duck typing)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"adaltm_core": 0, "adaltm_upstream": 1, "adaltm_downstream": 1, "adaltm_s3prl": 2, "adaltm_recipes": 3,
          "adaltm_cli": 4}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for package in LAYERS for path in (ROOT / package).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Imported modules; `from package import module` depends on that module, not on the package's __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found


def test_packages_depend_one_way_and_only_adaltm_s3prl_imports_s3prl():
    modules = _modules()
    for module, path in modules.items():
        package = module.split(".")[0]
        for imported in _imports(path, modules):
            target = imported.split(".")[0]
            if target in LAYERS and target != package:
                assert LAYERS[target] < LAYERS[package], f"{module} imports {imported}"
            if target == "s3prl":
                assert package == "adaltm_s3prl", f"{module} imports {imported}"


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {m: {i for i in _imports(p, modules) if i in modules} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def _compared_strings(path: Path) -> set[str]:
    """String constants a module compares with (`==`, `!=`, `in`), directly or inside a tuple, list or set."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                found |= {item.value for item in items
                          if isinstance(item, ast.Constant) and isinstance(item.value, str)}
    return found


def test_only_the_lambda_tables_compare_granularity_names():
    from adaltm_upstream.lambdas import TABLES

    for module, path in _modules().items():
        if module != "adaltm_upstream.lambdas":
            assert not _compared_strings(path) & set(TABLES), f"{module} compares a granularity name"


def _names(tree: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def test_export_merges_with_the_forwards_own_function():
    """`adaltm export` builds no merge module: it calls the pure `merge_group` that the upstream's forward calls."""
    export = _names(ast.parse((ROOT / "adaltm_upstream" / "export.py").read_text()))
    forward = next(node for node in ast.walk(ast.parse((ROOT / "adaltm_upstream" / "merging.py").read_text()))
                   if isinstance(node, ast.FunctionDef) and node.name == "forward")
    assert {"fill_group", "merge_group"} <= export and "GroupedMerge" not in export
    assert "merge_group" in _names(forward)
