"""The errors of an export that must not produce a file at all. TensorFlow-free.

Errors of an exported file that cannot be trusted (`ArtifactError` and its
kinds) belong to the contract the phone shares: `contract.artifacts.errors`.
"""
from __future__ import annotations


class ExportError(Exception):
    """An export that cannot produce a usable artifact (nothing is written)."""


class UnsupportedOpError(ExportError):
    """The converted model needs an op LiteRT does not ship as a built-in (Flex or custom)."""

    def __init__(self, ops: list[str], what: str = "model"):
        super().__init__(f"{what} needs op(s) outside the TFLite built-ins: {', '.join(ops)}; "
                         "a phone's LiteRT interpreter has no Flex delegate, so the export is refused")
        self.ops = ops
