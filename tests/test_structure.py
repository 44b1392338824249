"""The package's shape, read from its source: imports point one way, shard_map
lives in parallel/ (and the optimizer's own in optim/distributed.py), functions
fit on a screen. Each rule is checked on the real tree and shown to fail on a
tree that breaks it."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "muonjax"

# The imports of muonjax made inside a function, and why each is there: the
# core install (`pip install muonjax`, no flax) and the CLI's start stay light.
LAZY_IMPORTS = {
    # `import muonjax` is the optimizer alone (jax, optax): flax only on use
    ("muonjax", "muonjax.nnx_axes"): "nnx_matrix_axes imports flax",
}

MAX_FUNCTION_LINES = 60  # a function's lines, its docstring excluded
SHARD_MAP_HOMES = ("parallel/", "optim/distributed.py")


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imported(module: str, node, is_package: bool, modules) -> list[str]:
    """The muonjax modules an import statement names (a `from m import x` names
    m.x where that is a module, else m)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return [n for n in names if n in modules and n != module]


def import_graph(root: pathlib.Path = PACKAGE):
    """({module: modules it imports}, [(module, imported, line) made inside a function])."""
    modules = _modules(root)
    graph, lazy = {m: set() for m in modules}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        in_function = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, node, path.name == "__init__.py", modules):
                    graph[module].add(target)
                    if id(node) in in_function:
                        lazy.append((module, target, node.lineno))
    return graph, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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


def long_functions(root: pathlib.Path = PACKAGE, limit: int = MAX_FUNCTION_LINES):
    """[(file:line name, lines)] of the functions longer than `limit`, docstring excluded."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node) is not None:
                doc = node.body[0]
                lines -= doc.end_lineno - doc.lineno + 1
            if lines > limit:
                found.append((f"{path.relative_to(root.parent)}:{node.lineno} {node.name}", lines))
    return found


def shard_map_outside_homes(root: pathlib.Path = PACKAGE) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if "shard_map" in path.read_text()
        and not str(path.relative_to(root)).startswith(SHARD_MAP_HOMES)
    ]


def test_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 40  # the whole package was read
    assert cycles(graph) == []


def test_imports_inside_functions_are_the_listed_ones():
    _, lazy = import_graph()
    assert {(m, t) for m, t, _ in lazy} <= set(LAZY_IMPORTS), lazy


def test_layers_import_down_only():
    """optim/ imports nothing else of ours; models/ not train/, parallel/ or the CLI;
    parallel/ not train/ or the CLI; only `python -m muonjax` imports the CLI."""
    graph, _ = import_graph()
    above = {
        "muonjax.files": ("muonjax.optim", "muonjax.models", "muonjax.parallel", "muonjax.train"),
        "muonjax.optim": ("muonjax.models", "muonjax.parallel", "muonjax.train", "muonjax.files"),
        "muonjax.models": ("muonjax.parallel", "muonjax.train", "muonjax.cli"),
        "muonjax.parallel": ("muonjax.train", "muonjax.cli"),
    }
    wrong = [
        (m, t)
        for m, targets in graph.items()
        for t in targets
        for layer, forbidden in above.items()
        if (m == layer or m.startswith(layer + ".")) and t.startswith(forbidden)
    ]
    wrong += [
        (m, "muonjax.cli")
        for m, targets in graph.items()
        if "muonjax.cli" in targets and m != "muonjax.__main__"
    ]
    assert wrong == []


def test_shard_map_only_in_parallel_and_distributed_muon():
    assert shard_map_outside_homes() == []


def stdlib_names(root: pathlib.Path = PACKAGE) -> list[str]:
    """Our modules named like one of the standard library's (as train/inspect.py was)."""
    return [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if path.stem in sys.stdlib_module_names
    ]


def test_no_module_is_named_like_the_standard_librarys():
    assert stdlib_names() == []


def test_functions_fit_on_a_screen():
    assert long_functions() == []


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "muonjax"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.mark.parametrize("relative", [False, True])
def test_the_checks_fail_on_a_tree_that_breaks_them(tmp_path, relative):
    a_imports_b = "from . import b\n" if relative else "from muonjax import b\n"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": a_imports_b,
            "b.py": 'def f():\n    """Doc."""\n    import muonjax.a\n    return jax.shard_map\n',
            "parallel/__init__.py": "x = jax.shard_map\n",
            "train/inspect.py": "",
            "long.py": f'def g():\n    """Doc\n\n    more.\n    """\n{body}\n',
        },
    )
    graph, lazy = import_graph(package)
    assert cycles(graph) == [["muonjax.a", "muonjax.b"]]
    assert [(m, t) for m, t, _ in lazy] == [("muonjax.b", "muonjax.a")]
    assert shard_map_outside_homes(package) == ["b.py"]
    assert stdlib_names(package) == ["train/inspect.py"]
    assert long_functions(package) == []  # 60 lines with the def, the docstring not counted
    (package / "long.py").write_text(f"def g():\n{body}\n    return x0\n")
    assert long_functions(package) == [("muonjax/long.py:1 g", MAX_FUNCTION_LINES + 1)]
