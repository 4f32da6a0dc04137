"""The package's imports run one way (issue 28): no circle between its modules, none between its rooms
(the subpackages and top-level modules), no import of the package's own code inside a function, and a
function-level import of anything else only for an optional or heavy dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cpmn"

#: third-party imports that may sit inside a function (matplotlib and antspyx: heavy, and set up before
#: import; dcm2niix: optional; torch.distributed's autograd collectives: only under torchrun)
LAZY_OK = ("matplotlib", "ants", "dcm2niix", "torch.distributed")


def lazy_ok(module: str) -> bool:
    return any(module == ok or module.startswith(ok + ".") for ok in LAZY_OK)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def targets(node: ast.Import | ast.ImportFrom, here: str) -> list[str]:
    """The modules an import statement loads, resolved to this package's module names where it names one."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = here if MODULES[here].name == "__init__.py" else here.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in MODULES else base)
    return out


def imports(here: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(the package modules imported at module level, [(line, module)] of the imports inside functions)."""
    tree = ast.parse(MODULES[here].read_text(encoding="utf-8"))
    top: set[str] = set()
    inside: list[tuple[int, str]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child, here):
                    if in_function:
                        inside.append((child.lineno, t))
                    elif t.split(".")[0] == "cpmn":
                        top.add(t)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return top, inside


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def room(module: str) -> str:
    """A module's room: its subpackage (cpmn.data, cpmn.evaluate, cpmn.synthetic) or the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_the_cycle_finder_finds_a_cycle_and_none_where_there_is_none():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert lazy_ok("torch.distributed.nn.functional") and lazy_ok("matplotlib.pyplot")
    assert not lazy_ok("torch") and not lazy_ok("torch.nn") and not lazy_ok("antsx")


def test_no_import_circle_between_modules():
    graph = {m: {t for t in imports(m)[0] if t in MODULES and t != m} for m in MODULES}
    assert cycle(graph) is None


def test_no_import_runs_back_up_between_rooms():
    graph: dict[str, set[str]] = {}
    for m in MODULES:
        for t in imports(m)[0]:
            if t in MODULES and room(t) != room(m):
                graph.setdefault(room(m), set()).add(room(t))
    assert cycle(graph) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_level_imports_are_only_optional_or_heavy_dependencies(module):
    _, inside = imports(module)
    own = [f"line {n}: {t}" for n, t in inside if t.split(".")[0] == "cpmn"]
    other = [f"line {n}: {t}" for n, t in inside if t.split(".")[0] != "cpmn" and not lazy_ok(t)]
    assert not own, f"{module} imports the package's own code inside a function: {own}"
    assert not other, f"{module} imports inside a function what is neither optional nor heavy: {other}"
