"""Repository state in SQLite, so that which models were loaded, what became of
each version, and which version a rollout made active survive restarts.

Rollout state (``rollout_*`` tables, ``operations``) changes only inside
transactions: an activation records ACTIVATING, loads, then commits ACTIVE and
the model's active/previous versions in one transaction, so a crash at any
moment leaves the previously committed active version in charge
(:meth:`StateStore.recover`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

events = logging.getLogger("tegrad.events")

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
CREATE TABLE IF NOT EXISTS rollout_models (
    model TEXT PRIMARY KEY,
    active INTEGER NOT NULL DEFAULT 0,    -- 0: none activated; the version policy chooses
    previous INTEGER NOT NULL DEFAULT 0,  -- where Rollback goes
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,                  -- STAGING | STAGED | ACTIVATING | ACTIVE | INACTIVE | FAILED
    reason TEXT NOT NULL DEFAULT '',
    precision TEXT NOT NULL DEFAULT '',
    engine_key TEXT NOT NULL DEFAULT '',
    calibration_cache_id TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '',      -- validation report (JSON)
    signer TEXT NOT NULL DEFAULT '',
    bundle_sha256 TEXT NOT NULL DEFAULT '',
    staged REAL NOT NULL DEFAULT 0,
    activated REAL NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,                  -- QUEUED | VERIFYING | BUILDING | VALIDATING | ACTIVATING | SUCCEEDED | FAILED
    done INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    upload_sha256 TEXT NOT NULL DEFAULT '',
    auto_activate INTEGER NOT NULL DEFAULT 0,
    stage_seconds TEXT NOT NULL DEFAULT '{}',
    report TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""

# Rollout states of a version (tegrad.v1.VersionState without its prefix).
STAGING, STAGED, ACTIVATING, ACTIVE, INACTIVE, FAILED = (
    "STAGING", "STAGED", "ACTIVATING", "ACTIVE", "INACTIVE", "FAILED")


@dataclass(frozen=True)
class RolloutVersion:
    model: str
    version: int
    state: str
    reason: str = ""
    precision: str = ""
    engine_key: str = ""
    calibration_cache_id: str = ""
    report: dict[str, Any] | None = None
    signer: str = ""
    bundle_sha256: str = ""
    staged: float = 0.0
    activated: float = 0.0


@dataclass(frozen=True)
class OperationRecord:
    id: str
    kind: str
    state: str
    created: float
    updated: float
    model: str = ""
    version: int = 0
    done: bool = False
    progress: str = ""
    error: str = ""
    upload_sha256: str = ""
    auto_activate: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None


@dataclass(frozen=True)
class Recovered:
    """What :meth:`StateStore.recover` changed: rollout work a crash or kill interrupted."""

    staging: list[RolloutVersion]      # now FAILED; their partial files must go
    activating: list[RolloutVersion]   # back to what they were before the activation began
    operations: list[OperationRecord]  # now FAILED


def event(name: str, **fields: Any) -> None:
    """One structured (JSON) log line per state change, for fleet log collectors."""
    events.info(json.dumps({"event": name, **fields}, sort_keys=True))


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True)


def _unjson(text: str) -> Any:
    return json.loads(text) if text else None


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writes are rare and tiny (state changes); one connection used from the event loop.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # The connection is in autocommit mode (isolation_level=None), where `with connection:`
        # starts no transaction; BEGIN IMMEDIATE makes several statements commit together or not at all.
        if self._db.in_transaction:  # nested: part of the enclosing transaction
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def set_loaded(self, name: str, loaded: bool) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO models(name, loaded, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET loaded=excluded.loaded, updated=excluded.updated",
                (name, int(loaded), time.time()),
            )

    def loaded_models(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM models WHERE loaded=1 ORDER BY name")]

    def set_version_state(self, model: str, version: int, state: str, reason: str = "", engine_id: str = "") -> None:
        with self._transaction():
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

    # -- rollout -------------------------------------------------------------------------------

    def rollout_model(self, model: str) -> tuple[int, int]:
        """(active version, previous active version); 0 where there is none."""
        row = self._db.execute("SELECT active, previous FROM rollout_models WHERE model=?", (model,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def rollout_models(self) -> list[str]:
        rows = self._db.execute("SELECT model FROM rollout_models UNION SELECT model FROM rollout_versions")
        return sorted(r[0] for r in rows)

    def rollout_versions(self, model: str | None = None) -> list[RolloutVersion]:
        query = "SELECT * FROM rollout_versions" + (" WHERE model=?" if model else "") + " ORDER BY model, version"
        cursor = self._db.execute(query, (model,) if model else ())
        names = [d[0] for d in cursor.description]
        out = []
        for row in cursor:
            d = dict(zip(names, row))
            d.pop("updated")
            d["report"] = _unjson(d["report"])
            out.append(RolloutVersion(**d))
        return out

    def rollout_version(self, model: str, version: int) -> RolloutVersion | None:
        return next((v for v in self.rollout_versions(model) if v.version == version), None)

    def _put_version(self, rv: RolloutVersion) -> None:
        cols = [f.name for f in fields(RolloutVersion)]
        values = [_json(rv.report) if c == "report" else getattr(rv, c) for c in cols]
        self._db.execute(
            f"INSERT OR REPLACE INTO rollout_versions({', '.join(cols)}, updated) "
            f"VALUES ({', '.join('?' * (len(cols) + 1))})", (*values, time.time()))

    def set_rollout_state(self, model: str, version: int, state: str, reason: str = "", **changes: Any) -> RolloutVersion:
        """One transition of a version already recorded (or a new record), in one transaction."""
        with self._transaction():
            old = self.rollout_version(model, version)
            new = replace(old or RolloutVersion(model, version, state), state=state, reason=reason, **changes)
            self._put_version(new)
        if old is None or old.state != state:
            event("version_state", model=model, version=version, old=old.state if old else "", new=state, reason=reason)
        return new

    def commit_activation(self, model: str, version: int, previous: int) -> None:
        """``version`` becomes ACTIVE, the one it replaces INACTIVE, and Rollback points at ``previous``."""
        now = time.time()
        with self._transaction():
            replaced = [v for v in self.rollout_versions(model) if v.state == ACTIVE and v.version != version]
            old = self.rollout_version(model, version)
            self._db.execute("UPDATE rollout_versions SET state=?, reason='', updated=? "
                             "WHERE model=? AND state=? AND version<>?", (INACTIVE, now, model, ACTIVE, version))
            self._db.execute("UPDATE rollout_versions SET state=?, reason='', activated=?, updated=? "
                             "WHERE model=? AND version=?", (ACTIVE, now, now, model, version))
            self._db.execute(
                "INSERT INTO rollout_models(model, active, previous, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(model) DO UPDATE SET active=excluded.active, previous=excluded.previous, "
                "updated=excluded.updated", (model, version, previous, now))
        if old is None or old.state != ACTIVE:
            event("version_state", model=model, version=version, old=old.state if old else "", new=ACTIVE, reason="")
        for v in replaced:
            event("version_state", model=model, version=v.version, old=ACTIVE, new=INACTIVE, reason="")
        event("active_version", model=model, version=version, previous=previous)

    def delete_rollout_version(self, model: str, version: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM rollout_versions WHERE model=? AND version=?", (model, version))
            self._db.execute("UPDATE rollout_models SET previous=0 WHERE model=? AND previous=?", (model, version))

    def put_operation(self, op: OperationRecord) -> None:
        cols = [f.name for f in fields(OperationRecord)]
        values = [_json(op.report) if c == "report" else json.dumps(op.stage_seconds) if c == "stage_seconds"
                  else int(getattr(op, c)) if c in ("done", "auto_activate") else getattr(op, c) for c in cols]
        with self._transaction():
            self._db.execute(f"INSERT OR REPLACE INTO operations({', '.join(cols)}) "
                             f"VALUES ({', '.join('?' * len(cols))})", values)

    def delete_operations(self, ids: list[str]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM operations WHERE id=?", [(i,) for i in ids])

    def operations(self, *, model: str = "", not_done: bool = False) -> list[OperationRecord]:
        where, args = [], []
        if model:
            where.append("model=?")
            args.append(model)
        if not_done:
            where.append("done=0")
        query = "SELECT * FROM operations" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created"
        cursor = self._db.execute(query, args)
        names = [d[0] for d in cursor.description]
        out = []
        for row in cursor:
            d = dict(zip(names, row))
            d.update(done=bool(d["done"]), auto_activate=bool(d["auto_activate"]),
                     stage_seconds=json.loads(d["stage_seconds"] or "{}"), report=_unjson(d["report"]))
            out.append(OperationRecord(**d))
        return out

    def recover(self) -> Recovered:
        """After a start: mark rollout work that a crash interrupted, in one transaction.

        STAGING versions become FAILED, ACTIVATING ones return to INACTIVE (if they had been active
        before) or STAGED, unfinished operations become FAILED. The active version recorded is
        untouched: it is the one committed last.
        """
        why = "interrupted by a restart of tegrad"
        now = time.time()
        with self._transaction():
            versions = self.rollout_versions()
            staging = [v for v in versions if v.state == STAGING]
            activating = [v for v in versions if v.state == ACTIVATING]
            for v in staging:
                self._put_version(replace(v, state=FAILED, reason=f"staging {why}; stage the bundle again"))
            for v in activating:
                self._put_version(replace(v, state=INACTIVE if v.activated else STAGED, reason=f"activation {why}"))
            ops = self.operations(not_done=True)
            for op in ops:
                self._db.execute("UPDATE operations SET state='FAILED', done=1, error=?, updated=? WHERE id=?",
                                 (f"{why} while {op.state.lower()}", now, op.id))
        for v in staging:
            event("version_state", model=v.model, version=v.version, old=STAGING, new=FAILED, reason=why)
        for v in activating:
            event("version_state", model=v.model, version=v.version, old=ACTIVATING,
                  new=INACTIVE if v.activated else STAGED, reason=why)
        for op in ops:
            event("operation", id=op.id, model=op.model, version=op.version, old=op.state, new="FAILED", reason=why)
        return Recovered(staging, activating, ops)
