"""No import cycles among stepscope's modules (module-level imports, read from the source's syntax trees)."""

from __future__ import annotations

import ast
from pathlib import Path

import stepscope

SRC = Path(stepscope.__file__).resolve().parent  # src/stepscope


def module_files(root: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: its body, and the bodies of its top-level
    if/try/with blocks and classes (not functions, not `if TYPE_CHECKING:`)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                found.append(s)
            elif isinstance(s, ast.If):
                if not _is_type_checking(s.test):
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, ast.Try):
                visit(s.body)
                for h in s.handlers:
                    visit(h.body)
                visit(s.orelse)
                visit(s.finalbody)
            elif isinstance(s, (ast.With, ast.ClassDef)):
                visit(s.body)

    visit(tree.body)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the stepscope modules that its module-level imports execute.

    Importing `a.b.c` also runs the packages `a` and `a.b` first, unless they are already being imported: the
    importing module itself and its own packages always are (Python imports a package before its modules).
    `from pkg import name` runs `pkg` (needed for an attribute of it) and, where `name` is a module, `pkg.name`.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        in_progress = {name, *_ancestors(name)}
        edges: set[str] = set()
        for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
                attributes = len(submodules) < len(node.names)
                targets = submodules + ([source] if attributes or source not in in_progress else [])
            for t in targets:
                edges |= {m for m in [t, *_ancestors(t)] if m in modules and m not in in_progress}
                if t in modules and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycles_in_stepscope():
    found = cycles(import_graph(module_files()))
    assert not found, "import cycles among stepscope modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("from .sub import b\nx = 1\n")
    (pkg / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "sub" / "k.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import typing\nfrom . import k\nif typing.TYPE_CHECKING:\n    from .. import c\n"
                                      "def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("try:\n    from .sub.b import f\nexcept ImportError:\n    pass\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.k"}  # its own package is already importing; not TYPE_CHECKING, functions
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.b"}  # pkg.sub's __init__ runs first
    assert cycles(graph) == []
    (pkg / "sub" / "b.py").write_text("from ..c import y\n")  # a -> sub.b -> c -> sub.b
    (pkg / "c.py").write_text("from .sub import b\ny = 2\n")
    assert cycles(import_graph(module_files(pkg))) == [["pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("y = 2\n")
    (pkg / "sub" / "k.py").write_text("from . import VALUE\n")  # an attribute of the package: it must run
    (pkg / "sub" / "__init__.py").write_text("from .k import VALUE as V\nVALUE = 1\n")
    assert cycles(import_graph(module_files(pkg))) == [["pkg.sub", "pkg.sub.k"]]


def test_vllm_plugin_never_imports_the_driver():
    """stepscope.vllm.plugin (loaded inside vLLM's processes) imports nothing of stepscope.vllm.driver (the user's
    process) nor of its parent package's driver-side names, at module level or inside functions; and loading the
    plugin's entry points in a fresh interpreter loads no driver module."""
    import os
    import subprocess
    import sys

    plugin = SRC / "vllm" / "plugin"
    assert (plugin / "register.py").exists() and (SRC / "vllm" / "driver" / "client.py").exists()
    for path in sorted(plugin.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative to the package stepscope.vllm.plugin
                    pkg = ["stepscope", "vllm", "plugin"][: 4 - node.level]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith("stepscope.vllm.driver") or n == "stepscope.vllm"]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"
    code = ("import sys, stepscope.vllm.plugin.register, stepscope.vllm.plugin.requests, "
            "stepscope.vllm.plugin.stats_file\n"
            "print([m for m in sys.modules if m.startswith('stepscope.vllm.driver')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC.parent)}).stdout
    assert out.strip() == "[]"
