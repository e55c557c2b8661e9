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


def imported_names(path: Path) -> set[str]:
    """Every dotted name ``path`` imports (``from a.b import c`` -> ``a.b`` and ``a.b.c``), lazy imports
    included, ``TYPE_CHECKING`` blocks excluded."""
    tree = ast.parse(path.read_text())
    guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", "") == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def imported_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_names(path)} & set(ALLOWED)


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


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    """Depth-first over ``graph``; fails naming the first cycle it meets."""
    done, stack = set(), []

    def visit(node):
        assert node not in stack, f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}"
        if node in done:
            return
        stack.append(node)
        for dependency in sorted(graph.get(node, ())):
            visit(dependency)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_package_graph_has_no_cycles():
    assert_acyclic(package_graph())


# Inside analysis/, by role: commands -> studies -> readers -> reports (analysis/__init__.py).
ANALYSIS_ORDER = ("commands", "studies", "readers", "reports")


def imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` imports (``from a.b import c`` -> ``a.b`` and, where ``a/b/c.py`` exists,
    ``a.b.c``)."""
    return {name for name in imported_names(path) if name.split(".")[0] in ALLOWED and _module_path(name) is not None}


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[name] = imported_modules(path) - {name}
    return graph


def test_no_module_imports_itself_back_through_others():
    """No cycle between modules either, lazy imports included (a lazy cycle is a layering bug postponed)."""
    assert_acyclic(module_graph())


def test_analysis_imports_point_down_its_roles():
    bad = []
    for path in (ROOT / "analysis").rglob("*.py"):
        role = path.relative_to(ROOT / "analysis").parts[0].removesuffix(".py")
        if role not in ANALYSIS_ORDER:
            continue
        below = ANALYSIS_ORDER[ANALYSIS_ORDER.index(role):]
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "analysis" and len(parts) > 1 and parts[1] not in below:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"analysis/ imports against its roles (commands -> studies -> readers -> reports): {bad}"


def test_the_checker_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from routers.routing import Routing\n"
                      "def f():\n    from collapse import signature\n    import analysis.reports.tables\n")
    assert imported_packages(source) == {"collapse", "analysis"}
