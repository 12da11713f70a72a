"""Errors of an artifact (plan, app model, manifest, vocabulary) that cannot be trusted. TF-free.

The phone and the server raise and catch these when an exported file, its
manifest or its vocabulary does not check out; `contract.artifacts.manifest` is where
they are raised.
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
