"""Import arrows run one way: entry points -> run/ -> analysis/, callbacks/, tasks/ -> records/ -> collapse/ ->
the routing record (routers/), with common/ underneath everything. Parsed from the source, lazy imports
inside functions included; only ``if TYPE_CHECKING:`` blocks are exempt (annotations, never executed)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each package may import besides itself. routers/ knows nothing of the metrics; collapse/ knows the
# routing record only by its duck type; the record files (records/) know neither Lightning code nor analysis.
ALLOWED = {
    "common": set(),
    "routers": {"common"},
    "collapse": {"common"},
    "datamodules": {"common", "collapse"},
    "records": {"common", "collapse"},
    "tasks": {"common", "collapse", "records", "routers", "datamodules"},
    "callbacks": {"common", "collapse", "records", "datamodules"},
    "analysis": {"common", "collapse", "records", "routers", "datamodules", "tasks", "callbacks"},
    "run": {"common", "collapse", "records", "routers", "datamodules", "tasks", "callbacks", "analysis"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", "") == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & set(ALLOWED)


def package_graph() -> dict[str, set[str]]:
    graph = {package: set() for package in ALLOWED}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            graph[package] |= imported_packages(path) - {package}
    return graph


def test_every_package_imports_only_what_sits_below_it():
    bad = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            extra = imported_packages(path) - ALLOWED[package] - {package}
            if extra:
                bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"imports against the direction: {bad}"


def test_the_package_graph_has_no_cycles():
    graph, done, stack = package_graph(), set(), []

    def visit(package):
        assert package not in stack, f"import cycle: {' -> '.join(stack[stack.index(package):] + [package])}"
        if package in done:
            return
        stack.append(package)
        for dependency in graph[package]:
            visit(dependency)
        stack.pop()
        done.add(package)

    for package in graph:
        visit(package)


def test_the_checker_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from routers.routing import Routing\n"
                      "def f():\n    from collapse import signature\n    import analysis.tables\n")
    assert imported_packages(source) == {"collapse", "analysis"}
