"""Every module of the package imports on its own, the package has no import cycles, and `raysim run`
checks its config and data without loading torch, peft, transformers or scipy on the driver."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raysim"
HEAVY = ("torch", "peft", "transformers", "scipy")


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the package, found on disk (the layout may change)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1] if len(sys.argv) > 1 else MODULES):
    for loaded in [m for m in sys.modules if m == "raysim" or m.startswith("raysim.")]:
        del sys.modules[loaded]                       # a clean slate of raysim modules for each import
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    # __main__ runs the CLI when imported; everything else must import with nothing imported before it
    names = [n for n in _modules() if not n.endswith("__main__")]
    proc = _run(f"MODULES = {json.dumps(json.dumps(names))}\n" + IMPORT_EACH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "modules that fail to import on their own:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in failed.items())


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every import statement, at any depth (functions included), except under `if TYPE_CHECKING:`,
    which never runs."""
    for node in ast.iter_child_nodes(tree):
        for child in node.orelse if _is_type_checking(node) else [node]:
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from _imports(child)


def test_imports_include_functions_but_not_type_checking_blocks():
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
                     "def f():\n    from d import e\n")
    assert [n.names[0].name if isinstance(n, ast.Import) else n.module for n in _imports(tree)] == ["a", "c", "d"]


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    """The package modules an import statement loads (the deepest existing module of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set().union(*(_targets(n, name, path.name == "__init__.py", modules)
                                    for n in _imports(tree)))
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each strongly connected part of the graph that has one."""
    cycles, done = [], set()
    for start in sorted(graph):
        stack, on_path = [(start, iter(sorted(graph[start])))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                done.add(node)
                stack.pop()
                on_path.pop()
            elif child in on_path:
                cycles.append(on_path[on_path.index(child):] + [child])
                done.update(on_path)
                break
            elif child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                on_path.append(child)
    return cycles


def test_find_cycles_reports_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert {"raysim.config", "raysim.errors", "raysim.aggregators.base"} <= set(graph)
    assert "raysim.aggregators" in graph["raysim.config"]           # function-level imports count
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


CONFIG_PATH = """
import sys
from raysim.cli import main
rc = main(["run", "experiments/tiny.yaml", "--out", sys.argv[1], "--set", "data.partition.scheme=iid",
           "--set", "data.source=csv:" + sys.argv[1] + "/missing.csv"])
print(rc, " ".join(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""


def test_the_driver_checks_a_run_without_torch_or_scipy(tmp_path):
    """`raysim run` up to the data checks (config, overrides, aggregator, model name, ranks, data source)."""
    code = f"HEAVY = {HEAVY!r}\nimport sys; sys.argv[1:] = [{str(tmp_path)!r}]\n" + CONFIG_PATH
    proc = _run(code)
    rc, _, heavy = proc.stdout.strip().splitlines()[-1].partition(" ")
    assert rc == "2" and "data.source: file not found" in proc.stderr, proc.stderr[-2000:]
    assert heavy == "", f"the driver imported {heavy} while checking the config"
