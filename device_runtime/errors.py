"""One base class for what goes wrong on the phone, and where other errors become it.

Everything the phone's runtime expects to go wrong — the server unreachable
or refusing a request, a download that keeps failing its hash, a task
interrupted or over its budget, a secure-aggregation message that does not
check out, LiteRT or the disk failing — is a `DeviceError`, so the loops that
must outlive it (`Task.run`, `Device.step`, the app-model refresh,
personalization) catch one type. Each says what a task does about it:

* `reason`  — the failure reason code reported to the server, the only thing
  that leaves the phone (`contract.protocol.wire.FailureReport`);
* `outcome` — the participation log's outcome: `interrupted` or `error`;
* `detail`  — the participation log's detail, which stays on the phone;
* `plan_reusable` — whether the loaded LiteRT plan may serve the next task
  (not if LiteRT may have failed half-way).

The errors of what the phone calls are mapped where they enter it: the
server's answers (`contract.protocol.errors.ProtocolError`) in
device_runtime.client, secure aggregation's (`contract.secagg.masking.SecAggError`)
in device_runtime.secagg, and those of the work itself — an artifact that
does not check out, LiteRT, numpy, the disk, memory — by `device_errors()`
around it. Anything else is a bug: it is not caught here (`Device.step` logs
it with its traceback and goes on).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from contract.artifacts.errors import ArtifactError
from contract.protocol.errors import ProtocolError


class DeviceError(Exception):
    """An error the phone expects, and what a task reports and logs for it (module docstring)."""

    reason: str = "error"
    outcome: str = "error"
    plan_reusable: bool = False

    def __init__(self, message: str, *, name: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.name = name or type(self).__name__     # what happened, as the log names it
        self.detail = detail if detail is not None else f"{self.name}: {message}"


class TaskFailed(DeviceError):
    """The task cannot go on; `reason` is one of the server's failure reasons."""

    plan_reusable = True

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}", detail=detail)
        self.reason = reason
        self.outcome = "error" if reason == "error" else "interrupted"


class ServerRefused(DeviceError):
    """The server answered with an error, or with an answer that does not parse (`error`)."""

    def __init__(self, error: ProtocolError):
        super().__init__(str(error), name=type(error).__name__)
        self.error = error

    @property
    def status(self) -> int:
        return self.error.status


class SecAggRefused(DeviceError):
    """A secure-aggregation message that does not check out, or a request that would break a rule."""

    plan_reusable = True

    def __init__(self, message: str):
        super().__init__(message, name="SecAggError", detail=f"secure aggregation: {message}")


class OutOfMemory(DeviceError):
    """The task ran out of memory (the estimate from the manifest was not enough)."""

    reason, outcome = "out_of_memory", "interrupted"

    def __init__(self) -> None:
        super().__init__("MemoryError", detail="MemoryError")


class LocalFailure(DeviceError):
    """What the phone ran failed: an artifact that does not check out, LiteRT, the disk."""


@contextlib.contextmanager
def device_errors() -> Iterator[None]:
    """Run the phone's work with the errors of what it calls raised as `DeviceError`s."""
    try:
        yield
    except MemoryError:
        raise OutOfMemory() from None
    except (ArtifactError, OSError, ValueError, RuntimeError) as e:
        raise LocalFailure(str(e), name=type(e).__name__) from e
