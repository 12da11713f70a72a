"""A content-addressed folder: files are named by their sha256 and never change.

Plans, checkpoints, app models, vocabularies and manifests are stored here and
served by hash, so they can be cached forever (ETag = hash, immutable) and a
device can verify every byte it downloaded. Writes go to a temporary file in
the same file system and are renamed into place, so a reader (or a restart
after a crash) never sees a partial file under a real name; storing the same
bytes twice is a no-op. Every stored file is mode 0600 (the server serves
them; nobody else on the host reads the private store's).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def is_sha256(text: str) -> bool:
    return bool(_SHA256.match(text))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """put bytes or a file → sha256; path/read by sha256."""

    def __init__(self, root: str | Path, fsync: bool = False):
        self.root = Path(root)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).is_file()

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            fd, tmp = tempfile.mkstemp(dir=self._tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                self._sync(f)
            self._place(Path(tmp), sha256)
        return sha256

    def put_file(self, source: str | Path, move: bool = False) -> str:
        """Store a file's bytes; with `move`, the source (on this file system) is consumed."""
        source = Path(source)
        sha256 = sha256_file(source)
        if self.exists(sha256):
            if move:
                source.unlink()
            return sha256
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        os.close(fd)
        if move:
            os.replace(source, tmp)
        else:
            shutil.copyfile(source, tmp)
        if self._fsync:
            with open(tmp, "rb+") as f:
                self._sync(f)
        self._place(Path(tmp), sha256)
        return sha256

    def scratch_dir(self) -> Path:
        """A private temporary directory on the store's file system (caller removes it)."""
        return Path(tempfile.mkdtemp(dir=self._tmp))

    def verify(self, sha256: str) -> bool:
        return self.exists(sha256) and sha256_file(self.path(sha256)) == sha256

    def __iter__(self) -> Iterator[str]:
        for path in self.root.glob("??/*"):
            if is_sha256(path.name):
                yield path.name

    def _place(self, tmp: Path, sha256: str) -> None:
        final = self.path(sha256)
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o600)          # a moved-in file keeps its mode: the server's files are its own
        os.replace(tmp, final)
        if self._fsync:
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _sync(self, f) -> None:
        if self._fsync:
            f.flush()
            os.fsync(f.fileno())
