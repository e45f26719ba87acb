"""The import graph of the package: no cycle (imports inside functions included), no module reading
another module's private names, and every module importable first in a fresh interpreter.

The graph is read from the source with ``ast``, so an import inside a function, which only runs
when the function is called, counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "largebatch"


def modules(root: str = REPO, package: str = PACKAGE) -> dict[str, str]:
    """Every module of ``package`` under ``root``: dotted name -> file (a package is its __init__.py)."""
    found = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        rel = os.path.relpath(folder, root).split(os.sep)
        for f in sorted(files):
            if f.endswith(".py"):
                parts = rel if f == "__init__.py" else rel + [f[:-3]]
                found[".".join(parts)] = os.path.join(folder, f)
    return found


@dataclass(frozen=True)
class Import:
    """``name`` (a submodule or any other name) read by ``importer`` from module ``module``, or the
    module itself (``name`` None)."""
    importer: str
    module: str
    name: str | None
    line: int


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _source(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` reads from, a relative one resolved against ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))


def imports(module: str, path: str, known: dict[str, str]) -> list[Import]:
    """Every import of a module of the package in ``path``, wherever it sits in the file, relative
    imports resolved; ``from pkg import sub`` of a submodule reads ``sub`` from ``pkg`` and imports
    ``pkg.sub``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = _package_of(module, path.endswith("__init__.py"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    found.append(Import(module, a.name, None, node.lineno))
                    if a.asname and "." in a.name:  # import a.b.c as d: d is c read from a.b
                        parent, _, last = a.name.rpartition(".")
                        found.append(Import(module, parent, last, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _source(node, package)
            if source.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                found.append(Import(module, source, a.name, node.lineno))
                if f"{source}.{a.name}" in known:
                    found.append(Import(module, f"{source}.{a.name}", None, node.lineno))
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def graph(known: dict[str, str]) -> dict[str, dict[str, int]]:
    """importer -> {imported module: line}. Importing ``a.b.c`` runs ``a``'s and ``a.b``'s __init__
    first, so it is an import of those too, but for the packages the importer is itself inside:
    those have started to run before it did, and Python does not run them again. A name read from
    such a package is an import of it, as a name read from any module is: ``from largebatch import
    fit``, and ``from largebatch.engine import checkpoint`` inside largebatch/engine/, which reads
    the package while its __init__ may still be running."""
    edges: dict[str, dict[str, int]] = {m: {} for m in known}
    for module, path in known.items():
        inside = set(_ancestors(module))
        for imp in imports(module, path, known):
            targets = [p for p in _ancestors(imp.module) if p not in inside]
            if imp.name is not None or imp.module not in inside:
                targets.append(imp.module)
            for t in targets:
                if t in known and t != module:
                    edges[module].setdefault(t, imp.line)
    return edges


def _shortest_cycle(start: str, component: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """The shortest cycle from ``start`` back to itself through modules of ``component``."""
    paths, frontier = {start: [start]}, [start]
    while True:
        back = [v for v in frontier if start in edges[v]]
        if back:
            return paths[min(back)] + [start]
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w in component and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt


def components(edges: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Cycles that pass through every module on one: in each strongly connected component, the
    shortest cycle through each module that no cycle listed before passes through."""
    found = []
    for component in components(edges):
        covered: set[str] = set()
        for start in sorted(component):
            if start not in covered:
                cycle = _shortest_cycle(start, component, edges)
                covered.update(cycle)
                found.append(cycle)
    return sorted(found)


def describe(cycle: list[str], edges: dict[str, dict[str, int]], known: dict[str, str]) -> str:
    steps = [f"  {a} ({os.path.relpath(known[a], REPO)}:{edges[a][b]}) imports {b}"
             for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def _write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_hidden_cycles_and_private_reads(tmp_path):
    """On a package made up here: a cycle hidden in a function through a relative import, one
    through a name read from the root package, one through a package read by its own submodule;
    a sibling imported from its defining module inside a package is none."""
    _write(tmp_path, {
        f"{PACKAGE}/__init__.py": "def fit():\n    from largebatch.api import run\n    return run\n",
        f"{PACKAGE}/api.py": "from largebatch.data.base import Base\nfrom largebatch.models import net\nrun = Base\n",
        f"{PACKAGE}/models.py": "from largebatch import __version__\nnet = __version__\n",
        f"{PACKAGE}/data/__init__.py": "from largebatch.data.base import Base\nfrom largebatch.data.sets import make\n",
        f"{PACKAGE}/data/base.py": "class Base:\n    pass\n",
        f"{PACKAGE}/data/sets.py": "from largebatch.data.base import Base\n_cache = {}\n\n\ndef make():\n"
                                   "    from .disk import load\n    return load()\n",
        f"{PACKAGE}/data/disk.py": "from .sets import _cache\n\n\ndef load():\n    return _cache\n",
        f"{PACKAGE}/engine/__init__.py": "from largebatch.engine.loop import Loop\n",
        f"{PACKAGE}/engine/loop.py": "from largebatch.engine import state\nfrom largebatch.engine._util import x\n"
                                     "Loop = state.State\n",
        f"{PACKAGE}/engine/state.py": "State = 1\n",
        f"{PACKAGE}/engine/_util.py": "x = 1\n",
        "bench.py": "from largebatch.engine._util import x\nimport largebatch.data.sets as s\ns._cache\n",
    })
    known = modules(str(tmp_path))
    edges = graph(known)
    assert "largebatch.data" not in edges["largebatch.data.base"]
    assert cycles(edges) == [
        ["largebatch", "largebatch.api", "largebatch.models", "largebatch"],
        ["largebatch.data.disk", "largebatch.data.sets", "largebatch.data.disk"],
        ["largebatch.engine", "largebatch.engine.loop", "largebatch.engine"],
    ]
    disk = tmp_path / PACKAGE / "data" / "disk.py"
    assert private_reads("largebatch.data.disk", str(disk), known) == [
        f"{os.path.relpath(disk, REPO)}:1 imports largebatch.data.sets._cache"]
    assert private_reads("largebatch.engine.loop", str(tmp_path / PACKAGE / "engine" / "loop.py"), known) == []
    bench = os.path.relpath(tmp_path / "bench.py", REPO)
    assert private_reads("bench", str(tmp_path / "bench.py"), known) == [
        f"{bench}:1 imports the private module largebatch.engine._util",
        f"{bench}:3 reads largebatch.data.sets._cache"]


def test_the_package_has_no_import_cycle():
    known = modules()
    edges = graph(known)
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(describe(c, edges, known) for c in found)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module(importer: str, module: str) -> str | None:
    """The first private part of ``module``'s dotted name that ``importer`` is outside of (a module
    ``pkg._x`` is private to the package ``pkg``), or None."""
    parts = module.split(".")
    for k, part in enumerate(parts):
        owner = ".".join(parts[:k])
        if _is_private(part) and not (importer == owner or importer.startswith(owner + ".")):
            return ".".join(parts[:k + 1])
    return None


def _module_names(tree: ast.AST, package: str, known: dict[str, str]) -> dict[str, str]:
    """Names the file binds to modules of the package by importing them: name -> module."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    bound[a.asname or PACKAGE] = a.name if a.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            source = _source(node, package)
            for a in node.names:
                if f"{source}.{a.name}" in known:
                    bound[a.asname or a.name] = f"{source}.{a.name}"
    return bound


def private_reads(module: str, path: str, known: dict[str, str]) -> list[str]:
    """Where ``module`` reads a private name of another module, or a private module from outside
    its package: ``from m import _x``, ``import pkg._m``, ``m._x`` on a module it imported."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    where = os.path.relpath(path, REPO)
    found = []
    for imp in imports(module, path, known):
        private = _private_module(module, imp.module)
        if private:
            found.append(f"{where}:{imp.line} imports the private module {private}")
        elif imp.name is not None and _is_private(imp.name) and f"{imp.module}.{imp.name}" not in known:
            found.append(f"{where}:{imp.line} imports {imp.module}.{imp.name}")
    bound = _module_names(tree, _package_of(module, path.endswith("__init__.py")), known)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id in bound):
            continue
        current = bound[base.id]
        for attr in chain:
            if f"{current}.{attr}" in known:
                current = f"{current}.{attr}"
                private = _private_module(module, current)
                if private:
                    found.append(f"{where}:{node.lineno} reads the private module {private}")
                    break
            else:
                if _is_private(attr) and current != module:
                    found.append(f"{where}:{node.lineno} reads {current}.{attr}")
                break
    return sorted(set(found))


def scripts() -> dict[str, str]:
    """The benchmark scripts, which import the package as a user's code does: name -> file."""
    folder = os.path.join(REPO, "benchmarks")
    return {f"benchmarks.{f[:-3]}": os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")}


def test_no_module_reads_another_modules_private_names():
    known = modules()
    found = [line for module, path in {**known, **scripts()}.items() for line in private_reads(module, path, known)]
    assert not found, "private names read from another module:\n" + "\n".join(found)


PRELOAD = ("torch", "numpy", "yaml", "PIL.Image")
"""Imported once before the forks: none of them imports the package."""

FRESH_IMPORTS = """
import importlib, json, os, sys, traceback
for name in {preload!r}:
    __import__(name)
failed = {{}}
for module in {modules!r}:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)
        try:
            importlib.import_module(module)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        error = f.read()
    if os.waitpid(pid, 0)[1] != 0:
        failed[module] = error
print(json.dumps(failed))
"""


def import_each_first(root: str, names: list[str], preload: tuple = PRELOAD) -> dict[str, str]:
    """Import each module of ``names`` (found under ``root``) as the first of its package in its
    process: forks of one fresh interpreter that has imported ``preload`` and nothing of the
    package. Returns {module: traceback} of those that fail."""
    script = FRESH_IMPORTS.format(preload=preload, modules=names)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per module")


@needs_fork
def test_a_module_that_imports_only_after_another_is_found(tmp_path):
    """``a`` imports ``b``, which takes a name ``a`` has not defined yet: ``b`` imported first works,
    ``a`` imported first fails."""
    _write(tmp_path, {f"{PACKAGE}/__init__.py": "", f"{PACKAGE}/a.py": "import largebatch.b\nX = 1\n",
                      f"{PACKAGE}/b.py": "from largebatch.a import X\n"})
    failed = import_each_first(str(tmp_path), ["largebatch", "largebatch.a", "largebatch.b"], preload=())
    assert list(failed) == ["largebatch.a"] and "cannot import name 'X'" in failed["largebatch.a"]


@needs_fork
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module is the first of the package imported in its process: a fork of one fresh
    interpreter that has imported torch, numpy, yaml and Pillow and nothing of the package."""
    failed = import_each_first(REPO, sorted(modules()))
    assert not failed, "modules that do not import first:\n" + "\n".join(f"{m}:\n{e}" for m, e in failed.items())
