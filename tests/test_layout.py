"""Who may import whom: each package one room with one job.

* `contract` (what phone, server and simulation agree on) imports neither
  TensorFlow nor Flask, nor any of the packages that use it;
* `device_runtime` (what runs on a phone) imports nothing from the emulator,
  the server, the tests or the TensorFlow side of `models`/`tflite_export`;
* `server` never imports TensorFlow, the phone runtime or the emulator;
* `benchmarks` never imports `tests`.

Checked on the source (every import statement, also inside functions), and
for the TensorFlow bar in a fresh interpreter as well.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from emulation.deployment import REPO

RULES = {
    "contract": {"tensorflow", "tensorflow_federated", "flask", "werkzeug", "models", "server",
                 "device_runtime", "emulation", "tflite_export", "tests", "benchmarks"},
    "device_runtime": {"emulation", "server", "tests", "benchmarks", "tensorflow", "tensorflow_federated",
                       "flask", "models", "tflite_export.export", "tflite_export.plan",
                       "tflite_export.app_model", "tflite_export.convert"},
    "server": {"tensorflow", "tensorflow_federated", "device_runtime", "emulation", "tests", "benchmarks",
               "models", "tflite_export"},
    "privacy": {"tensorflow", "tensorflow_federated", "flask", "werkzeug", "models", "server",
                "device_runtime", "emulation", "tflite_export", "tests", "benchmarks"},
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


def test_contract_and_phone_runtime_load_without_tensorflow_or_flask():
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for pkg in ("contract", "privacy")
               for p in (REPO / pkg).rglob("*.py") if p.stem != "__init__"]
    modules += [f"device_runtime.{p.stem}" for p in (REPO / "device_runtime").glob("*.py")
                if p.stem not in ("__init__", "__main__")]
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
        if path.name in ("schema.py", "store.py", "store_pg.py"):
            continue                       # the schema itself, and the backends' version bookkeeping
        for table in writes.findall(path.read_text()):
            if table in OWNERS:
                writers.setdefault(table, set()).add(path.stem)
    wrong = {t: sorted(w) for t, w in writers.items() if w != {OWNERS[t]}}
    assert not wrong, f"tables written outside their owner: {wrong}"
    assert len(writers) >= len(OWNERS) - 1    # the scan does see the writes (buckets: ratelimit's own file)
