"""The phone's local participation log ("opstats", as in Google's FL system).

One row per event (check-in, its outcome, a finished or aborted task) with
durations and bytes. The log is bounded (oldest rows go first). It answers the
minimum-separation rule ("when did I last train for this population?") and
`python -m device_runtime status`. It holds no typed text.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path


class OpStats:
    def __init__(self, path: str | Path, max_rows: int = 1000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, "
                         "ts REAL NOT NULL, kind TEXT NOT NULL, outcome TEXT NOT NULL, "
                         "detail TEXT NOT NULL)")
        self._db.commit()

    def log(self, ts: float, kind: str, outcome: str, **detail: object) -> None:
        """Record one event; `detail` holds numbers and codes (durations, bytes, reasons)."""
        with self._lock, self._db:
            self._db.execute("INSERT INTO events(ts, kind, outcome, detail) VALUES (?, ?, ?, ?)",
                             (ts, kind, outcome, json.dumps(detail, sort_keys=True)))
            self._db.execute("DELETE FROM events WHERE id NOT IN "
                             "(SELECT id FROM events ORDER BY id DESC LIMIT ?)", (self.max_rows,))

    def events(self, limit: int | None = None) -> list[dict]:
        """Newest first."""
        sql = "SELECT ts, kind, outcome, detail FROM events ORDER BY id DESC"
        with self._lock:
            rows = self._db.execute(sql + (" LIMIT ?" if limit else ""),
                                    (limit,) if limit else ()).fetchall()
        return [{"ts": ts, "kind": k, "outcome": o, **json.loads(d)} for ts, k, o, d in rows]

    def last_success(self, kind: str = "task") -> float | None:
        """Time of the last completed task, for the minimum-separation rule."""
        with self._lock:
            row = self._db.execute("SELECT MAX(ts) FROM events WHERE kind = ? AND outcome = ?",
                                   (kind, "completed")).fetchone()
        return row[0]

    def summary(self) -> dict:
        """Counts per (kind, outcome), for diagnostics."""
        with self._lock:
            rows = self._db.execute("SELECT kind, outcome, COUNT(*) FROM events "
                                    "GROUP BY kind, outcome ORDER BY kind, outcome").fetchall()
        return {f"{k}/{o}": n for k, o, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
