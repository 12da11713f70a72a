"""Who may import whom: each package one room with one job.

* `contract` (what phone, server and simulation agree on) imports neither
  TensorFlow nor Flask, nor any of the packages that use it;
* `device_runtime` (what runs on a phone) imports nothing from the emulator,
  the server, the tests or the TensorFlow side of `models`/`tflite_export`;
* `server` never imports TensorFlow, the phone runtime or the emulator;
* `models` (the model, its training and simulation) never imports the exporter
  `tflite_export`, which builds on it;
* `deploy` (running the server beyond one process) imports nothing from the
  emulator or TensorFlow: `import deploy`, and this module, load without it;
* `benchmarks` never imports `tests`;
* no two modules of one package import each other, directly or through
  others of that package.

Checked on the source (every import statement, also inside functions), and
for the TensorFlow bar in a fresh interpreter as well.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "device_runtime", "server", "models", "tflite_export", "privacy", "emulation", "deploy",
            "benchmarks", "tests")

RULES = {
    "contract": {"tensorflow", "tensorflow_federated", "flask", "werkzeug", "models", "server",
                 "device_runtime", "emulation", "tflite_export", "deploy", "tests", "benchmarks"},
    "device_runtime": {"emulation", "server", "deploy", "tests", "benchmarks", "tensorflow", "tensorflow_federated",
                       "flask", "models", "tflite_export.export", "tflite_export.plan",
                       "tflite_export.app_model", "tflite_export.convert"},
    "server": {"tensorflow", "tensorflow_federated", "device_runtime", "emulation", "deploy", "tests", "benchmarks",
               "models", "tflite_export"},
    "privacy": {"tensorflow", "tensorflow_federated", "flask", "werkzeug", "models", "server",
                "device_runtime", "emulation", "tflite_export", "deploy", "tests", "benchmarks"},
    "models": {"tflite_export", "server", "device_runtime", "emulation", "deploy", "tests", "benchmarks"},
    "deploy": {"emulation", "tensorflow", "tensorflow_federated", "models", "tflite_export", "device_runtime",
               "tests", "benchmarks"},
    "benchmarks": {"tests"},
    "emulation": {"tests", "benchmarks"},
}


def imports(package: str) -> dict[str, set[str]]:
    """module file → every module name it imports (absolute, as written)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(REPO))] = names
    return out


def forbidden(name: str, banned: set[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


@pytest.mark.parametrize("package", sorted(RULES))
def test_packages_import_only_what_their_job_needs(package):
    bad = {f"{module}: {name}" for module, names in imports(package).items() for name in names
           if forbidden(name, RULES[package])}
    assert not bad, sorted(bad)


def test_the_checks_see_imports_inside_functions():
    assert "emulation.fleet" in imports("tests")["tests/e2e.py"]
    assert forbidden("tflite_export.export", RULES["device_runtime"])
    assert not forbidden("tflite_export.reader", RULES["device_runtime"])


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run: all but those under `if TYPE_CHECKING:` (annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def module_graph(package: str) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports (relative imports resolved; `from a import b`
    is module a.b if there is one, else a; a name no module has counts for its nearest enclosing package)."""
    files = {module_name(p): p for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        for target in targets:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph.setdefault(name, set()).add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_between_modules_of_a_package(package):
    assert not cycles(module_graph(package)), f"import cycles in {package}: {cycles(module_graph(package))}"


def test_the_cycle_check_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert module_graph("pkg") == {"pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.c"}}
    assert cycles(module_graph("pkg")) == []
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(module_graph("pkg")) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_deploy_and_this_module_load_without_tensorflow_or_the_emulator():
    modules = ["deploy"] + [f"deploy.{p.stem}" for p in (REPO / "deploy").glob("*.py") if p.stem != "__init__"]
    modules += ["tests.test_layout", "emulation.deployment"]
    script = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
              "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_federated'))\n"
              "bad += sorted(m for m in sys.modules if m.startswith('emulation') and m != 'emulation.deployment'"
              " and not m == 'emulation')\n"
              "print(bad)\nassert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_contract_and_phone_runtime_load_without_tensorflow_or_flask():
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for pkg in ("contract", "privacy")
               for p in (REPO / pkg).rglob("*.py") if p.stem != "__init__"]
    modules += [module_name(p) for p in (REPO / "device_runtime").rglob("*.py") if p.stem != "__main__"]
    script = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
              "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'flask', 'emulation'))\n"
              "print(bad)\nassert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_table_is_written_by_its_one_owning_module():
    """server.schema.OWNERS: no service writes another's table (issue 20), checked on the source."""
    import re

    from server.schema import MIGRATIONS, OWNERS

    created = {m for migration in MIGRATIONS for m in re.findall(r"CREATE TABLE (\w+)", migration)}
    assert created == set(OWNERS), created ^ set(OWNERS)
    writes = re.compile(r"(?:INSERT INTO|UPDATE|DELETE FROM) (\w+)")
    writers: dict[str, set[str]] = {}
    for path in (REPO / "server").rglob("*.py"):
        if path.name == "schema.py" or path.parent.name == "store":
            continue                       # the schema itself, and the backends' version bookkeeping
        for table in writes.findall(path.read_text()):
            if table in OWNERS:
                writers.setdefault(table, set()).add(path.stem)
    wrong = {t: sorted(w) for t, w in writers.items() if w != {OWNERS[t]}}
    assert not wrong, f"tables written outside their owner: {wrong}"
    assert len(writers) >= len(OWNERS) - 1    # the scan does see the writes (buckets: ratelimit's own file)


def _sql_tables(text: str, pattern: str) -> set[str]:
    import re

    from server.schema import OWNERS

    return {t for t in re.findall(pattern, text) if t in OWNERS}


def test_every_table_is_read_only_by_its_one_owning_module():
    """No service reads another's table with SQL: it calls the owner (server.schema.OWNERS)."""
    from server.schema import OWNERS

    reads: dict[str, set[str]] = {}
    for path in (REPO / "server").rglob("*.py"):
        if path.name == "schema.py" or path.parent.name == "store":
            continue
        for table in _sql_tables(path.read_text(), r"(?:FROM|JOIN)\s+(\w+)"):
            reads.setdefault(table, set()).add(path.stem)
    wrong = {t: sorted(r) for t, r in reads.items() if r != {OWNERS[t]}}
    assert not wrong, f"tables read outside their owner: {wrong}"
    assert {"rounds", "sessions", "partials", "personal_evals", "discovery_votes"} <= set(reads)   # it sees reads


def test_the_lifecycle_and_the_commit_reach_task_kinds_only_through_the_registry():
    """server/rounds.py and server/reporting.py name no kind module, no kind and no report type."""
    from contract.tasks import KINDS

    for name in ("rounds.py", "reporting.py"):
        path = REPO / "server" / name
        tree = ast.parse(path.read_text())
        kind_modules = {f"server.tasks.{k}" for k in ("train", "eval", "personalize", "discover")}
        assert not kind_modules & imports("server")[f"server/{name}"], name
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & set(KINDS), f"{name} names a task kind: {literals & set(KINDS)}"
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "isinstance" not in calls and "type" not in calls, f"{name} tests a value's type"


def test_only_the_train_kind_touches_the_running_sum():
    """The `partials` table: SQL only in server/partials.py, used only by the train kind (and built by services)."""
    for path in (REPO / "server").rglob("*.py"):
        if path.name in ("schema.py", "partials.py"):
            continue
        assert not _sql_tables(path.read_text(), r"(?:FROM|JOIN|INTO|UPDATE)\s+(partials)\b"), path
    users = {module for module, names in imports("server").items() if "server.partials" in names}
    assert users == {"server/tasks/train.py", "server/services.py"}, users


PRODUCT = ("contract", "device_runtime", "server", "models", "tflite_export", "privacy", "emulation", "deploy")
DATA_FUNCTIONS = {"server/openapi.py": {"_document"}}   # generated data: one long literal, read as data


def test_no_product_module_over_400_lines_and_no_function_over_60():
    long_modules, long_functions = [], []
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            where = str(path.relative_to(REPO))
            if len(text.splitlines()) > 400:
                long_modules.append(f"{where} ({len(text.splitlines())})")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and node.end_lineno - node.lineno + 1 > 60 and node.name not in DATA_FUNCTIONS.get(where, ()):
                    long_functions.append(f"{where}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long_modules and not long_functions, (long_modules, long_functions)
