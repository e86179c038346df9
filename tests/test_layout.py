"""The package reads top to bottom: no import cycle between dsbs_ray's modules, counting the imports
inside functions (they run too) and leaving out `if TYPE_CHECKING:` blocks (annotations only)."""
import ast
from pathlib import Path

import dsbs_ray

ROOT = Path(dsbs_ray.__file__).parent


def _module(path: Path) -> str:
    parts = ("dsbs_ray",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= set().union(*(_imports(n, modules) for n in node.orelse)) if node.orelse else set()
            continue
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        found |= _imports(node, modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in ROOT.rglob("*.py")}
    return {m: _imports(ast.parse(p.read_text()), set(paths)) - {m} for m, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(m, path):
        if state.get(m) == "done":
            return None
        if state.get(m) == "open":
            return path[path.index(m):] + [m]
        state[m] = "open"
        for d in sorted(graph[m]):
            if cycle := visit(d, path + [m]):
                return cycle
        state[m] = "done"
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def _below(graph, m) -> set[str]:
    seen, todo = set(), [m]
    while todo:
        for d in graph[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert {"dsbs_ray.data", "dsbs_ray.job", "dsbs_ray.students"} <= graph["dsbs_ray.train"]  # the parser sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the training side, bottom up: none of these reaches one that comes after it
    chain = ["dsbs_ray.cache", "dsbs_ray.loss", "dsbs_ray.families", "dsbs_ray.students", "dsbs_ray.job",
             "dsbs_ray.data", "dsbs_ray.evaluate", "dsbs_ray.train"]
    for i, m in enumerate(chain):
        assert not _below(graph, m) & set(chain[i + 1:]), m
