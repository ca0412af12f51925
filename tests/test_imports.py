"""The import graph of the sparsa package: no cycles (lazy imports inside functions
included: a cycle hidden in a function is still two modules that need each other), and
the engine never imports the measuring tools."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sparsa"
# measuring tools (benchmarks, profilers, the peers' installers): the CLI dispatches to them
TOOLS = "sparsa.bench"
ENTRY_POINTS = ("sparsa.cli", "sparsa.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                r = resolve(t) if t.startswith("sparsa") else None
                if r and r != m:
                    graph[m].add(r)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _is_tool(m: str) -> bool:
    return m == TOOLS or m.startswith(TOOLS + ".")


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_engine_never_imports_the_measuring_tools():
    bad = sorted(f"{m} -> {t}" for m, deps in import_graph().items()
                 if not _is_tool(m) and m not in ENTRY_POINTS for t in deps if _is_tool(t))
    assert bad == []


def test_the_engine_imports_without_the_extras():
    """Without the optional packages (server, plot, offload, bench extras) the engine and
    the CLI still import, and `sparsa serve` names the extra it needs."""
    import subprocess
    import sys

    code = """
import sys
BLOCKED = {"fastapi", "uvicorn", "prometheus_client", "httpx", "matplotlib", "zstandard"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import sparsa, sparsa.llm, sparsa.engine.llm_engine, sparsa.offload.loading
from sparsa.cli import build_parser, main
build_parser()
rc = main(["serve", "mixtral-mini", "--load-format", "dummy"])
assert rc != 0
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'sparsa[server]'" in out.stderr, out.stderr[-2000:]
