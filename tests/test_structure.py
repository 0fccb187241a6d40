"""The package layout: no import cycles between modules (function-level imports included), and
library code (mpc_llama, eviction, protocols) never imports experiments/."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mpc_llama", "eviction", "protocols", "experiments")
LIBRARY = ("mpc_llama", "eviction", "protocols")


def modules():
    """{dotted module name: file path} for every .py file of PACKAGES (a package by its name)."""
    found = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[name.removesuffix(".__init__")] = path
    return found


def import_graph(mods):
    """{module: set of project modules it imports anywhere in its body}. `from a import b`
    counts as importing a.b where a.b is a module, else a."""
    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = deps - {None, name}
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    mods = modules()
    assert {"experiments.run_accuracy", "experiments.merge_accuracy", "eviction.base",
            "eviction.clusters"} <= set(mods)
    graph = import_graph(mods)
    assert "experiments.accuracy_results" in graph["experiments.merge_accuracy"]  # seen
    assert cycles(graph) == []


def test_library_never_imports_experiments():
    graph = import_graph(modules())
    bad = sorted((m, d) for m, deps in graph.items() if m.split(".")[0] in LIBRARY
                 for d in deps if d.split(".")[0] == "experiments")
    assert bad == []
