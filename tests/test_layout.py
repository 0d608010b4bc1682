"""The code's shape: stages as sub-packages that import only downwards, small modules and functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from cnnexp import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "cnnexp"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the cnnexp modules it imports, anywhere in its body (functions too)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, tree in modules.items():
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnexp"):
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("cnnexp")}
        graph[name] = {t for t in targets if t and t != name and t != "cnnexp"}
    return graph


def test_no_import_cycles_counting_sub_packages_and_imports_inside_functions():
    modules = _modules()
    graph = _imports(modules)

    def package(name: str) -> str:  # cnnexp.study.engine -> cnnexp.study; cnnexp.run -> cnnexp.run
        parts = name.split(".")
        return ".".join(parts[:2])

    stages = {}
    for name, targets in graph.items():
        stages.setdefault(package(name), set()).update(package(t) for t in targets if package(t) != package(name))

    def cycle(g, start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in g.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    assert not {" -> ".join(c) for m in graph if (c := cycle(graph, m))}
    assert not {" -> ".join(c) for m in stages if (c := cycle(stages, m))}
    assert {"cnnexp.data.load", "cnnexp.study.engine", "cnnexp.reporting.write", "cnnexp.tracking.runs"} <= set(graph)


def test_the_study_and_the_report_never_import_each_other_and_only_the_clis_join_them():
    """`cnnexp.sweep`, `cnnexp.report` and `cnnexp.ui` are the CLIs that join the stages; nothing imports them,
    the study (cnnexp.study) never imports the report (cnnexp.reporting) nor the reverse. No exemption."""
    graph = _imports(_modules())
    clis = {"cnnexp.sweep", "cnnexp.report", "cnnexp.ui"}
    assert clis <= set(graph)
    for name, targets in graph.items():
        assert not targets & clis, f"{name} imports a CLI: {targets & clis}"
        if name.startswith("cnnexp.study"):
            assert not any(t.startswith("cnnexp.reporting") for t in targets), f"{name} imports the report"
        if name.startswith("cnnexp.reporting"):
            assert not any(t.startswith("cnnexp.study") for t in targets), f"{name} imports the study"


def test_modules_and_functions_stay_small():
    too_long = []
    for name, tree in _modules().items():
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{name} has {lines} lines"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{name}.{node.name} ({length} lines)")
    assert not too_long, too_long


def test_package_inits_are_thin():
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        allowed = {"__future__", "pathlib", "os", "sys"}  # the standard library only, never a stage
        assert all((n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) in allowed for n in imports), path


@pytest.mark.parametrize("module", ["cnnexp.runtime", "cnnexp.run", "cnnexp.study.engine", "cnnexp.reporting.write"])
def test_importing_a_module_changes_no_environment_variable(module):
    code = (f"import os, json; before = dict(os.environ); import importlib; importlib.import_module({module!r}); "
            "print(json.dumps(sorted(k for k in os.environ if os.environ.get(k) != before.get(k))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "KERAS_", "MLFLOW_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
