"""The errors of tflite_export. TensorFlow-free.

Two families: `ArtifactError` for an exported file that cannot be trusted (the
phone and the server catch it and refuse the artifact), and `ExportError` for
an export that must not produce a file at all.
"""
from __future__ import annotations


class ArtifactError(Exception):
    """An exported artifact, its manifest or its vocabulary cannot be used."""


class MissingArtifact(ArtifactError, FileNotFoundError):
    """A manifest, model or vocabulary file is not where the manifest says."""


class HashMismatch(ArtifactError):
    """A file's sha256 differs from the one its manifest records."""

    def __init__(self, path: object, expected: str, actual: str):
        super().__init__(f"{path}: sha256 {actual} does not match the manifest's {expected}")
        self.path, self.expected, self.actual = path, expected, actual


class SchemaMismatch(ArtifactError):
    """A manifest of another schema version or kind, or one missing required fields."""


class VocabularyMismatch(ArtifactError):
    """The vocabulary beside the artifact is not the one it was exported with or the caller expects."""


class ExportError(Exception):
    """An export that cannot produce a usable artifact (nothing is written)."""


class UnsupportedOpError(ExportError):
    """The converted model needs an op LiteRT does not ship as a built-in (Flex or custom)."""

    def __init__(self, ops: list[str], what: str = "model"):
        super().__init__(f"{what} needs op(s) outside the TFLite built-ins: {', '.join(ops)}; "
                         "a phone's LiteRT interpreter has no Flex delegate, so the export is refused")
        self.ops = ops
