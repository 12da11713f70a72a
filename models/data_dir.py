"""Where the corpora live and how their files are checked: what both corpora (models.corpus, the users'
text, and models.public_corpus, the public text) share, in a module of its own so neither imports the other
to get it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


class CorpusError(Exception):
    """A corpus cannot be fetched, verified or read."""


def default_data_dir() -> Path:
    """``$NIGHTJAR_DATA`` if set, else ``<repo>/data`` (git-ignored)."""
    env = os.environ.get("NIGHTJAR_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
