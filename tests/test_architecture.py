"""Rules of the package's structure, read from the source: components never import a command module, the import
graph of ``ddrun`` has no cycle, no function is longer than 80 lines, and no line of the package, its tests or scripts
is longer than the project's 120 characters (``[tool.ruff] line-length``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ddrun

PACKAGE = Path(ddrun.__file__).parent
COMMANDS = {"ddrun.cli", "ddrun.distill", "ddrun.buffers", "ddrun.evaluate", "ddrun.report", "ddrun.teachers",
            "ddrun.export"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """``module -> {ddrun modules it imports}`` (module level and inside functions alike)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_component_imports_a_command_module():
    graph = imports()
    offenders = {m: sorted(d & COMMANDS) for m, d in graph.items() if m not in COMMANDS and d & COMMANDS}
    assert not offenders, offenders


def test_the_import_graph_has_no_cycle():
    graph = imports()
    # a package imports its own submodules to re-export them: that edge is not a dependency of the submodule
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_line_is_longer_than_the_projects_line_length():
    root = PACKAGE.parent
    setting = re.search(r"^line-length\s*=\s*(\d+)\s*$", (root / "pyproject.toml").read_text(), re.MULTILINE)
    assert setting, "pyproject.toml has no [tool.ruff] line-length"
    limit = int(setting[1])
    files = [p for d in ("ddrun", "tests", "scripts") for p in (root / d).rglob("*.py")]
    assert len(files) > 50  # the source tree, not an installed copy without tests
    long = [f"{p.relative_to(root)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > limit]
    assert not long, long
