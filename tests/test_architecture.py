"""The house rules, checked on the source: nothing outside engine.py reaches into the Engine's private state,
the import graph has no circle, no module grows past ~500 lines, and the decode loop exists once."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every workbench module `path` imports (at module level or inside functions), resolved to modules."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench"):
            for alias in node.names:  # `from workbench.attention import selectors` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("workbench")}
    return {m for m in found if m != name and not name.startswith(m + ".")}  # a package's own parents


def test_nothing_outside_the_engine_touches_its_private_state():
    offenders = []
    for name, path in modules().items():
        if name == "workbench.engine":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bengine\._[a-z]", line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_import_graph_has_no_circle():
    graph = {name: imports_of(path, name) for name, path in modules().items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name, [name])
    assert cycles == []


def test_no_module_is_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_decode_loop_exists_once():
    """Only the batch runner steps a decoder; the scheduler, bench and engine drive the runner."""
    steppers = [name for name, path in modules().items()
                if re.search(r"\.step\(self\.cache|decoder\.step\(|GraphedStep\(", path.read_text())]
    assert set(steppers) <= {"workbench.runtime.runner", "workbench.runtime.graphs", "workbench.runtime.decoder"}
    for name in ("workbench.scheduler", "workbench.bench", "workbench.engine"):
        source = modules()[name].read_text()
        assert "runner" in source and "Decoder(" not in source and "SlotKVCache" not in source, name
