"""The packages form a stack, each importing only itself and the ones below it, at module
level and inside functions alike; the torch-free core and the runtime import neither torch
nor onnx."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: (import package, folder)
STACK = [("ssd_core", "core"), ("ssd_runtime", "runtime"), ("ssd_engines", "engines"), ("ssd", "ssd"),
         ("ssd_export", "export")]
LEVEL = {package: i for i, (package, _) in enumerate(STACK)}


def project_imports(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, imported project package)`` for every import in ``path``, functions included
    (relative imports are the module's own package)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LEVEL]
    return found


@pytest.mark.parametrize("package, folder", STACK)
def test_each_package_imports_only_itself_and_the_ones_below(package, folder):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
             for path in sorted((ROOT / folder).rglob("*.py"))
             for line, imported in project_imports(path, package) if LEVEL[imported] > LEVEL[package]]
    assert not wrong, wrong


# console scripts and the package whose code they run
SCRIPTS = {"ssd-train": "ssd", "ssd-sample": "ssd", "ssd-eval": "ssd", "ssd-import": "ssd",
           "ssd-export": "ssd_export", "ssd-run": "ssd_runtime"}
PROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "system", "spawnv", "spawnvp", "execv",
                 "execvp", "execvpe", "execl", "execlp", "create_subprocess_exec", "create_subprocess_shell"}


def process_targets(path: Path) -> list[tuple[int, str]]:
    """``(line, project package)`` for every string that is exactly a project module
    (``"ssd_export.cli"``, for ``-m``) or console script, in a file that starts processes
    (subprocess, os.exec*, ...): the command may be built anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    starts = any(isinstance(node, ast.Call) and (node.func.attr if isinstance(node.func, ast.Attribute)
                                                 else getattr(node.func, "id", "")) in PROCESS_CALLS
                 for node in ast.walk(tree))
    if not starts:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            word = node.value.strip()
            root = word.split(".")[0]
            if root in LEVEL and all(part.isidentifier() for part in word.split(".")):
                found.append((node.lineno, root))
            elif word in SCRIPTS:
                found.append((node.lineno, SCRIPTS[word]))
    return found


@pytest.mark.parametrize("package, folder", STACK)
def test_no_package_starts_a_process_of_a_higher_one(package, folder):
    """A run-time call upward through a subprocess is a dependency too, which imports alone
    would not show (the runtime once exported the default model by running ssd_export.cli)."""
    wrong = [f"{path.relative_to(ROOT)}:{line} starts {target}"
             for path in sorted((ROOT / folder).rglob("*.py"))
             for line, target in process_targets(path) if LEVEL[target] > LEVEL[package]]
    assert not wrong, wrong


def test_the_process_rule_can_fail(tmp_path):
    """What the runtime's default model did before the packaged bundle: ``-m ssd_export.cli``."""
    sample = tmp_path / "sample.py"
    sample.write_text('import subprocess, sys\n'
                      'command = [sys.executable, "-m", "ssd_export.cli", "x"]\n'
                      'subprocess.Popen(command)\n'
                      'subprocess.run(["ssd-train", "--steps", "1"])\n')
    assert process_targets(sample) == [(2, "ssd_export"), (4, "ssd")]


@pytest.mark.parametrize("package", ["ssd_core", "ssd_runtime"])
def test_core_and_runtime_import_neither_torch_nor_onnx(package):
    code = (f"import sys, {package}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxscript'))\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "onnx", "onnxscript"}


def module_graph() -> dict[str, set[str]]:
    """``{module: project modules it imports}`` over every package (functions included)."""
    folders = {folder: package for package, folder in STACK}
    graph = {}
    for folder, package in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join([package, *path.relative_to(ROOT / folder).with_suffix("").parts]).removesuffix(".__init__")
            graph[name] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    base = package if node.level else node.module or ""
                    if node.level and node.module:
                        base = f"{package}.{node.module}"
                    targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                graph[name] |= {t for t in targets if t.split(".")[0] in LEVEL}
    return {name: {t for t in targets if t in graph and t != name and not name.endswith("__main__")}
            for name, targets in graph.items()}


def test_no_module_imports_form_a_cycle():
    graph, state, cycles = module_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
