"""Repository state in SQLite, so that which models were loaded, and what
became of each version, survives restarts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    loaded INTEGER NOT NULL,          -- 1: should be served after a restart (explicit mode)
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,              -- LOADING | READY | UNAVAILABLE | UNLOADING
    reason TEXT NOT NULL DEFAULT '',
    engine_id TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (model, version)
);
"""


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writes are rare and tiny (state changes); one connection used from the event loop.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def set_loaded(self, name: str, loaded: bool) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO models(name, loaded, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET loaded=excluded.loaded, updated=excluded.updated",
                (name, int(loaded), time.time()),
            )

    def loaded_models(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM models WHERE loaded=1 ORDER BY name")]

    def set_version_state(self, model: str, version: int, state: str, reason: str = "", engine_id: str = "") -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO versions(model, version, state, reason, engine_id, updated) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(model, version) DO UPDATE SET state=excluded.state, reason=excluded.reason, "
                "engine_id=excluded.engine_id, updated=excluded.updated",
                (model, version, state, reason, engine_id, time.time()),
            )

    def version_states(self, model: str | None = None) -> dict[tuple[str, int], tuple[str, str]]:
        query = "SELECT model, version, state, reason FROM versions"
        rows = self._db.execute(query + (" WHERE model=?" if model else ""), (model,) if model else ())
        return {(m, v): (s, r) for m, v, s, r in rows}
