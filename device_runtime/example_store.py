"""The phone's store of what its user typed. It never leaves the device.

A keyboard app calls `add(text, timestamp)` as the user commits text; training
reads it back with `texts()`. Retention bounds what is kept, by age and by
count (oldest go first), as Google's FL system expires example-store data.
Nothing in this module, or anything that reads it, sends text anywhere:
training turns it into token ids locally and only a weight delta is uploaded.
"""
from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Retention:
    max_age_s: float = 60 * 24 * 3600   # examples older than this are dropped (60 days)
    max_count: int = 10_000             # only the newest are kept beyond this


class ExampleStore:
    """SQLite-backed typed-text store with retention; safe to share between threads."""

    def __init__(self, path: str | Path, retention: Retention = Retention()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention = retention
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS examples ("
                         "id INTEGER PRIMARY KEY, ts REAL NOT NULL, text TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS examples_ts ON examples(ts)")
        self._db.commit()

    def add(self, text: str, timestamp: float | None = None) -> None:
        """Store one piece of typed text (blank text is ignored)."""
        self.add_many([(text, time.time() if timestamp is None else timestamp)])

    def add_many(self, items: Iterable[tuple[str, float]]) -> None:
        """Store (text, timestamp) pairs in one transaction (blank texts are ignored)."""
        items = list(items)
        if not all(isinstance(t, str) for t, _ in items):
            raise TypeError("text must be a str")
        rows = [(float(ts), t) for t, ts in items if t.strip()]
        with self._lock, self._db:
            self._db.executemany("INSERT INTO examples(ts, text) VALUES (?, ?)", rows)

    def apply_retention(self, now: float | None = None) -> int:
        """Drop expired and surplus examples; returns how many were dropped."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            old = self._db.execute("DELETE FROM examples WHERE ts < ?",
                                   (now - self.retention.max_age_s,)).rowcount
            surplus = self._db.execute(
                "DELETE FROM examples WHERE id NOT IN "
                "(SELECT id FROM examples ORDER BY ts DESC, id DESC LIMIT ?)",
                (self.retention.max_count,)).rowcount
        return old + surplus

    def texts(self, now: float | None = None) -> list[str]:
        """Retained texts, oldest first (retention applied first)."""
        self.apply_retention(now)
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT text FROM examples ORDER BY ts, id")]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]

    def clear(self) -> None:
        """Forget everything (the user's "clear learned words")."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM examples")

    def close(self) -> None:
        with self._lock:
            self._db.close()
