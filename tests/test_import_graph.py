"""The layout's rules, checked on the source: every `import`/`from` of the project's own
modules (those inside functions too), no cycles, no forbidden edge.

Rules (docs/design.md, "Folder map"):
- no import cycles between modules;
- `quasid.tokenizer` and `quasid.stack` never import each other (the SID table links them);
- `analysis` imports only `quasid.core` from the rest of the project;
- `quasid` imports nothing of `simulator`, `analysis` or `flows`;
- `quasid.core` imports no other part of the project, and no torch;
- `simulator` reaches the SID stack in one module (`simulator.arms`);
- only `flows` imports `flows`; nothing imports `benchmarks` or `tests`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quasid", "simulator", "analysis", "flows")
FORBIDDEN_ANYWHERE = ("benchmarks", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules (and `benchmarks`/`tests` roots) imported anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        root = target.split(".")[0]
        if root in FORBIDDEN_ANYWHERE:
            found.add(root)
            return
        if root not in PACKAGES:
            return
        # the longest prefix that is a module of the project (`a.b.c` may be a name in `a.b`)
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            add(str(node.args[0].value))  # importlib.import_module("x.y") counts too
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_imports_inside_functions(graph):
    # flows.cli imports Prefect's pipeline inside its `run` command only
    assert "flows.pipeline" in graph["flows.cli"]
    assert "quasid.stack.serving" in graph["simulator.arms"]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in graph.items():
        for dep in deps:
            why = None
            if dep in FORBIDDEN_ANYWHERE:
                why = f"nothing imports {dep}/"
            elif _in(src, "quasid.tokenizer") and _in(dep, "quasid.stack"):
                why = "the tokenizer never imports the stack"
            elif _in(src, "quasid.stack") and _in(dep, "quasid.tokenizer"):
                why = "the stack never imports the tokenizer"
            elif _in(src, "analysis") and not (_in(dep, "analysis") or _in(dep, "quasid.core")):
                why = "analysis imports only quasid.core"
            elif _in(src, "quasid") and dep.split(".")[0] in ("simulator", "analysis", "flows"):
                why = "quasid imports no simulator, analysis or flows"
            elif _in(src, "quasid.core") and not _in(dep, "quasid.core"):
                why = "quasid.core imports nothing else of the project"
            elif _in(src, "simulator") and src != "simulator.arms" and (
                    _in(dep, "quasid.stack") or _in(dep, "quasid.tokenizer")
                    or _in(dep, "quasid.evaluation")):
                why = "the simulator reaches the SID stack in simulator.arms only"
            elif _in(dep, "flows") and not _in(src, "flows"):
                why = "only flows imports flows"
            if why:
                bad.append(f"{src} -> {dep} ({why})")
    return sorted(bad)


def test_no_forbidden_edges(graph):
    assert forbidden_edges(graph) == []


def test_the_rules_catch_a_violation(graph):
    # the checker itself: a stack module importing the tokenizer, analysis importing the
    # simulator and a cycle are each reported
    broken = {k: set(v) for k, v in graph.items()}
    broken["quasid.stack.serving"].add("quasid.tokenizer.sids")
    broken["analysis.engine"].add("simulator.events")
    assert any("stack never imports the tokenizer" in e for e in forbidden_edges(broken))
    assert any("analysis imports only quasid.core" in e for e in forbidden_edges(broken))
    broken["quasid.core.schemas"].add("quasid.data.dataset")  # dataset imports schemas
    assert any(c[0] == c[-1] and "quasid.core.schemas" in c for c in find_cycles(broken))


def test_core_imports_no_torch():
    offenders = []
    for path in (ROOT / "quasid" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []
