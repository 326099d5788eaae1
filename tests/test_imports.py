"""No import circles inside the ``ngguard`` package: dependencies point one way.

The graph is read from the source with ``ast`` (nothing is imported): module A -> module B when A's
code imports B (``import ngguard.b``, ``from ngguard import b``, ``from .b import name``, ``from . import b``).

What counts as an import:
- module-level imports **and imports inside functions**: a function-local import runs too, and
  moving an import into a function is the usual way a circle is hidden rather than removed (both
  circles this test was written against, ``judge`` <-> ``judge_models`` and ``methods/neural_gate``
  <-> ``methods/reference``, have one side inside a function);
- not imports under ``if TYPE_CHECKING:`` (type hints only; never run).

An edge goes to the module named, not to its parent packages: importing ``ngguard.methods.dinm``
also runs ``ngguard/methods/__init__.py``, but a package that imports its own submodules is not a
circle of design. ``python tests/test_imports.py`` prints the graph's circles.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ngguard"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported ngguard module: line of the first such import}."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)

    def deepest(name: str) -> str | None:  # the longest prefix of ``name`` that is a module of ours
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # ``from X import y``: y is a submodule of X, or a name defined in X
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for t in targets:
                if t == package or t.startswith(package + "."):
                    target = deepest(t)
                    if target and target != mod:
                        edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    """One line per edge inside the circle: ``a (line N) -> b``."""
    members = set(comp)
    return "; ".join(f"{a} (line {line}) -> {b}" for a in comp for b, line in sorted(graph[a].items()) if b in members)


def test_the_graph_sees_module_level_and_function_local_imports(tmp_path):
    pkg = tmp_path / "ngguard"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from ngguard import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    (pkg / "sub" / "__init__.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("from ..c import y\nimport ngguard.sub\n")
    graph = import_graph(tmp_path, "ngguard")
    assert graph["ngguard.a"] == {"ngguard.b": 1}
    assert graph["ngguard.b"] == {"ngguard.a": 2}  # inside a function: counted
    assert graph["ngguard.c"] == {}  # TYPE_CHECKING only: not counted
    assert graph["ngguard.sub"] == {"ngguard.sub.d": 1}
    assert graph["ngguard.sub.d"] == {"ngguard.c": 1, "ngguard.sub": 2}
    assert cycles(graph) == [["ngguard.a", "ngguard.b"], ["ngguard.sub", "ngguard.sub.d"]]


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 20  # the package was found
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(f"  {' <-> '.join(c)}: {describe(graph, c)}" for c in found)


def test_the_light_modules_load_without_torch():
    """The function-local imports of torch / transformers kept in ``ngguard.judges.models`` (and the
    lazy ``ngguard.serving`` package) exist for this: the CLI, the recipe, the judges, the world and
    the serving options load without torch, transformers or Gradio (``ngguard --help`` or a recipe
    check starts in a fraction of a second). A fresh interpreter, nothing else imported."""
    import os
    import subprocess
    import sys

    light = ["ngguard.cli", "ngguard.recipe", "ngguard.judges", "ngguard.world.render", "ngguard.serving.options",
             "ngguard.serving"]
    heavy = ["torch", "transformers", "gradio", "onnxruntime", "peft", "accelerate", "matplotlib"]
    code = (f"import sys\nfor m in {light!r}: __import__(m)\n"
            f"print(','.join(h for h in {heavy!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"loaded by {light}: {out.stdout.strip()}"


if __name__ == "__main__":
    g = import_graph()
    cs = cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges, {len(cs)} circle(s)")
    for c in cs:
        print(f"  {' <-> '.join(c)}: {describe(g, c)}")


@pytest.mark.parametrize("old,new", [("ngguard.hooks", "ngguard.methods.hooks"),
                                     ("ngguard.fastpath", "ngguard.methods.fastpath"),
                                     ("ngguard.core", "ngguard.methods.core"),
                                     ("ngguard.keyword_filter", "ngguard.methods.keyword_filter"),
                                     ("ngguard.methods.corpus", "ngguard.world.corpus")])
def test_moved_modules_keep_their_old_import_path(old, new):
    """The edit engine moved into ``ngguard/methods/`` (issue 26): an old import gives the new module
    itself (so monkeypatching either name patches both) and says where it went."""
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new) and sys.modules[old] is mod


@pytest.mark.parametrize("old,name,new", [("ngguard.localize", "localize_layer", "ngguard.methods.neural_gate"),
                                          ("ngguard.edit", "dinm_layer", "ngguard.methods.dinm")])
def test_retired_modules_warn_and_keep_their_names_for_one_release(old, name, new):
    """``ngguard.localize`` and ``ngguard.edit`` (no project code imports them): importing one warns, naming
    where its names live now, and its names are those functions."""
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_no_project_code_imports_a_retired_module():
    """The package, its tests and benches use the new paths (the shims are for others' code; only a test
    of a shim, named for it (``old_import`` / ``deprecated`` / ``retired``), imports one)."""
    retired = {"ngguard.edit", "ngguard.localize", "ngguard.judge", "ngguard.judge_models", "ngguard.validate_judge",
               "ngguard.hooks", "ngguard.fastpath", "ngguard.core", "ngguard.keyword_filter", "ngguard.methods.corpus"}
    users = []
    for folder in ("ngguard", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            shim_tests = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                          and any(w in f.name for w in ("old_import", "deprecated", "retired")) for n in ast.walk(f)}
            for node in _imports(tree):
                if id(node) in shim_tests:
                    continue
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    base = module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
                    module = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") \
                        if node.level else node.module or ""
                    names = [module] + [f"{module}.{a.name}" for a in node.names]
                if retired & set(names):
                    users.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert users == []
