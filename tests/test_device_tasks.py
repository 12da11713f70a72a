"""The phone's task kinds (device_runtime.tasks) and its one error type (device_runtime.errors).

The tasks themselves run end to end in test_device_e2e, test_device_interrupts, test_personal_e2e
and the fleet tests; these check what the move must keep: one phone half per wire kind, a task
module that names no kind, and the failure codes and logs each error makes.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from contract.artifacts.errors import HashMismatch
from contract.protocol.errors import ProtocolError
from contract.secagg.masking import SecAggError
from contract.tasks import KINDS as WIRE_KINDS
from device_runtime.client import CorruptDownload
from device_runtime.errors import (DeviceError, LocalFailure, OutOfMemory, SecAggRefused, ServerRefused, TaskFailed,
                                   device_errors)
from device_runtime.secagg import SecAggLeft
from device_runtime.tasks import KINDS
from device_runtime.training import Interrupted
from device_runtime.transport import ServerUnavailable

ROOT = Path(__file__).resolve().parents[1] / "device_runtime"


def test_every_wire_kind_has_its_phone_half_under_its_name():
    assert set(KINDS) == set(WIRE_KINDS) == {"train", "eval", "personalize", "discover"}
    assert all(kind.name == name for name, kind in KINDS.items())
    assert {type(k).__module__ for k in KINDS.values()} == {f"device_runtime.tasks.{m}" for m in
                                                            ("train", "eval", "personalize", "discover")}


def test_the_common_task_names_no_kind():
    """task.py reaches the kinds through the registry only: no kind's name, no kind's module."""
    tree = ast.parse((ROOT / "task.py").read_text())
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body      # the docstring may name them
    strings = {n.value for node in body for n in ast.walk(node) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert not strings & set(WIRE_KINDS), strings & set(WIRE_KINDS)
    imported = {n.module for node in body for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and m.startswith("device_runtime.tasks.")}, imported


def test_every_exception_of_the_phone_is_a_device_error():
    modules = [".".join(p.relative_to(ROOT.parent).with_suffix("").parts) for p in ROOT.rglob("*.py")
               if p.stem != "__main__"]
    own = {cls for m in modules for _, cls in inspect.getmembers(importlib.import_module(m.replace(".__init__", "")),
                                                                  inspect.isclass)
           if issubclass(cls, BaseException) and cls.__module__.startswith("device_runtime")}
    assert {"TaskFailed", "Interrupted", "SecAggLeft", "CorruptDownload", "ServerUnavailable",
            "ServerRefused"} <= {c.__name__ for c in own}
    assert all(issubclass(cls, DeviceError) for cls in own), [c for c in own if not issubclass(c, DeviceError)]


def mapped(error: BaseException) -> DeviceError:
    with pytest.raises(DeviceError) as caught:
        with device_errors():
            raise error
    return caught.value


@pytest.mark.parametrize("error, reason, outcome, detail, reusable", [
    (TaskFailed("out_of_memory", "needs ~182 MiB"), "out_of_memory", "interrupted", "needs ~182 MiB", True),
    (TaskFailed("error", "the assignment has no training plan"), "error", "error",
     "the assignment has no training plan", True),
    (SecAggLeft("cancelled", "the round's secure aggregation is failed"), "cancelled", "interrupted",
     "the round's secure aggregation is failed", True),
    (Interrupted("unplugged", 3), "unplugged", "interrupted", "training interrupted after 3 batches: unplugged",
     True),
    (SecAggRefused("asked for both shares of [4]: refused"), "error", "error",
     "secure aggregation: asked for both shares of [4]: refused", True),
    (CorruptDownload("/a: 3 downloads, none with sha256 ab"), "error", "error",
     "CorruptDownload: /a: 3 downloads, none with sha256 ab", False),
    (ServerUnavailable("GET /x failed 5 times"), "error", "error", "ServerUnavailable: GET /x failed 5 times", False),
    (ServerRefused(ProtocolError("session_closed", "late")), "error", "error",
     "ProtocolError: HTTP 409 session_closed: late", False),
    (mapped(MemoryError()), "out_of_memory", "interrupted", "MemoryError", False),
    (mapped(OSError("disk full")), "error", "error", "OSError: disk full", False),
    (mapped(RuntimeError("LiteRT failed")), "error", "error", "RuntimeError: LiteRT failed", False),
    (mapped(ValueError("bad checkpoint")), "error", "error", "ValueError: bad checkpoint", False),
    (mapped(HashMismatch("plan.tflite", "ab", "cd")), "error", "error",
     "HashMismatch: plan.tflite: sha256 cd does not match the manifest's ab", False),
])
def test_each_error_says_the_code_to_report_and_what_to_log(error, reason, outcome, detail, reusable):
    """The failure codes and log details the task reported before the one DeviceError, kept."""
    assert (error.reason, error.outcome, error.detail, error.plan_reusable) == (reason, outcome, detail, reusable)


def test_errors_of_what_the_phone_calls_are_mapped_and_bugs_are_not():
    assert isinstance(mapped(OSError("x")), LocalFailure) and isinstance(mapped(MemoryError()), OutOfMemory)
    kept = TaskFailed("error", "x")
    assert mapped(kept) is kept
    with pytest.raises(KeyError):              # a bug is not a DeviceError: Device.step logs its traceback
        with device_errors():
            raise KeyError("a bug")
    with pytest.raises(SecAggError):           # the contract's secure aggregation errors enter at device_runtime.secagg
        with device_errors():
            raise SecAggError("x")
    refused = ServerRefused(ProtocolError("unauthorized", "who?"))
    assert refused.status == 401 and refused.name == "ProtocolError" and str(refused) == "HTTP 401 unauthorized: who?"
