"""The package's shape: no import cycles between its modules, counting imports inside functions too (they
only postpone a cycle). The core (the method) imports nothing from the command line or the study."""

import ast
from pathlib import Path

import prilora

ROOT = Path(prilora.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules}
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    # A package's __init__ re-exports its modules; an import of a submodule runs it, but the edge that
    # matters for a cycle is the module's own code, so packages count as the modules they import.
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges = graph()
    assert "prilora.cli" in edges and "prilora.study.sweep" in edges["prilora.cli"]  # the graph is real
    # A package's __init__ importing its own modules is how packages work, not a cycle of code.
    inner = {m: {t for t in ts if not (m.endswith(("prilora", "glue", "study")) and t.startswith(m + "."))}
             for m, ts in edges.items()}
    inner = {m: {t for t in ts if t != "prilora"} for m, ts in inner.items()}  # __version__ only
    assert cycles(inner) == []


def test_the_core_does_not_import_the_command_line_or_the_study():
    core = ("ranks", "config", "architectures", "statistics", "pruning", "model", "callback", "manifest")
    edges = graph()
    for name in core:
        reached, todo = set(), [f"prilora.{name}"]
        while todo:
            for nxt in edges[todo.pop()] - reached:
                reached.add(nxt)
                todo.append(nxt)
        assert not {m for m in reached if m.startswith(("prilora.cli", "prilora.arguments", "prilora.study",
                                                        "prilora.bench"))}, name
