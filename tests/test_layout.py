"""The package's shape (issue 24): no import cycles between pn_jax's modules, counting the
imports inside functions too; no module over about 450 lines unless its opening comment says
why; the core never imports research modules at import time."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "pn_jax"
MAX_LINES = 460


def modules() -> dict:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph(mods: dict) -> dict:
    """module -> {(imported pn_jax module, at module level?)}."""
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pn_jax"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pn_jax")]
            else:
                continue
            graph[m] |= {(t, id(node) in top) for t in targets if t in mods and t != m and t != "pn_jax"}
    return graph


def find_cycle(edges: dict):
    state = {}

    def visit(n, path):
        state[n] = 1
        for t in sorted(edges.get(n, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (c := visit(t, path + [t])):
                return c
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = import_graph(modules())
    edges = {m: {t for t, _ in ts} for m, ts in graph.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_research_only_inside_functions():
    graph = import_graph(modules())
    eager = [(m, t) for m, ts in graph.items() if not m.startswith("pn_jax.research")
             for t, top in ts if top and t.startswith("pn_jax.research")]
    assert not eager, eager


def test_long_modules_say_why():
    long = {m: len(p.read_text().splitlines()) for m, p in modules().items()
            if len(p.read_text().splitlines()) > MAX_LINES}
    unexplained = [m for m in long if "450 lines on purpose" not in (ast.get_docstring(ast.parse(
        modules()[m].read_text())) or "")]
    assert not unexplained, {m: long[m] for m in unexplained}
