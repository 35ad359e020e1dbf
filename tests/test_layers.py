"""The package's layering, read from its source: no import circle between its modules, and no
module using another module's private names (DESIGN.md, Layout and style)."""

import ast
from pathlib import Path

import kwneuro_sk

PACKAGE = Path(kwneuro_sk.__file__).parent

# Imports and private uses that are known and not yet removed: the test fails on any other
# one, and also once one of these is gone (so the lists only shrink).
KNOWN_CIRCLE_EDGES = set()
KNOWN_PRIVATE_USES = set()


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(module, node, known):
    """Modules a (from-)import statement of ``module`` loads, as (target, imported names)."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.startswith("kwneuro_sk")]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        is_package = (PACKAGE.parent / Path(*package) / "__init__.py").exists()
        anchor = package if is_package else package[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if not base.startswith("kwneuro_sk"):
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append((sub, []) if sub in known else (base, [alias.name]))
    return targets


def import_graph():
    known = modules()
    graph, private_imports = {}, []
    for name, path in known.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in resolve(name, node, known):
                    edges.add(target)
                    private_imports += [
                        (name, f"{target}.{n}")
                        for n in names
                        if n.startswith("_") and not n.startswith("__")
                    ]
        graph[name] = edges
    return graph, private_imports


def circles(graph):
    """Edges (a, b) that close a circle: b reaches a."""

    def reaches(start, goal):
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
        return False

    found = set()
    for a, targets in graph.items():
        for b in targets:
            # a package's __init__ importing its own submodules is how packages work
            if b.startswith(a + ".") or a.startswith(b + "."):
                continue
            if reaches(b, a):
                found.add((a, b))
    return found


def private_attribute_uses():
    """``something._name`` in one module where ``_name`` is defined in another module only,
    and ``something`` is not ``self``/``cls``/``super()``."""
    known = modules()
    defined = {}
    trees = {name: ast.parse(path.read_text()) for name, path in known.items()}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                defined.setdefault(node.name, set()).add(name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.setdefault(node.attr, set()).add(name)
    uses = set()
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            owners = defined.get(attr, set())
            if owners and name not in owners:
                uses.add((name, attr))
    return uses


def test_no_import_circle():
    graph, _ = import_graph()
    assert "kwneuro_sk.combat.harmonizer" in graph["kwneuro_sk.volumes.streaming"]  # sanity
    for a, b in KNOWN_CIRCLE_EDGES:
        assert b in graph[a], f"{a} -> {b} is gone: remove it from KNOWN_CIRCLE_EDGES"
        graph[a] = graph[a] - {b}
    assert circles(graph) == set()


def test_no_private_name_imported_from_another_module():
    _, private_imports = import_graph()
    assert private_imports == []


def test_no_private_attribute_of_another_module_used():
    assert private_attribute_uses() == KNOWN_PRIVATE_USES


def test_the_checks_find_a_circle_and_a_private_use():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p": {"p.a"}}
    assert circles(graph) == {("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a")}
    tree = ast.parse("from kwneuro_sk.combat.model import _CONSTANT_RESOLUTION")
    assert resolve("kwneuro_sk.x", tree.body[0], modules()) == [
        ("kwneuro_sk.combat.model", ["_CONSTANT_RESOLUTION"])
    ]
