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
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from daemon.errors import FailedPrecondition, NoSpace

events = logging.getLogger("tegrad.events")
log = logging.getLogger("tegrad.state")

_SQLITE_FULL = 13
_SQLITE_READONLY = 8
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

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


def _code(exc: BaseException) -> int | None:
    """SQLite's primary result code (Python >= 3.11 carries the extended one; 3.10 none: the messages decide)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return _code(exc) == _SQLITE_FULL or "database or disk is full" in str(exc)


class _Damaged(sqlite3.DatabaseError):
    """The file opens but does not hold a sound database."""


def _damaged(exc: sqlite3.Error) -> bool:
    """Damage, not a passing condition (a lock, a full disk) that must never cost the state."""
    if isinstance(exc, _Damaged) or _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(exc)
    return "file is not a database" in text or "malformed" in text


def _open(path: Path) -> sqlite3.Connection:
    """Open and check the database; raises sqlite3.DatabaseError when the file is not a sound one."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # quick_check reads every page (the file is small) without the index cross-checks.
        problems = [r[0] for r in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _Damaged("; ".join(problems[:3]))
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


@dataclass(frozen=True)
class LostState:
    """What :class:`StateStore` found at open when its database was unreadable."""

    why: str           # sqlite's complaint
    moved_to: Path     # where the bad file went
    restored: float    # mtime of the backup the state was restored from; 0: none, started empty


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.backup_path = path.with_name(path.name + ".backup")
        self.lost: LostState | None = None
        # Writes are rare and tiny (state changes); one connection used from the event loop.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                if path.is_file() and path.stat().st_size == 0 and self.backup_path.is_file():
                    raise _Damaged("the file is empty (truncated)")
                self._db = _open(path)
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                self.lost = self._replace_damaged(str(exc))
                self._db = _open(path)
        except (sqlite3.Error, OSError) as exc:  # locked by another tegrad, unreadable, no space: said, not traced
            err = self._storage_error(exc)
            if err is exc:
                err = FailedPrecondition(f"cannot open the state database {path}: {exc}"
                                         f"{' (is another tegrad using this state directory?)' if 'locked' in str(exc) else ''}")
            raise err from None

    def _replace_damaged(self, why: str) -> LostState:
        """Move the damaged database (and its -wal/-shm) aside; restore the backup copy if it is sound.

        A daemon that exits here restarts into the same file forever under systemd's
        Restart=on-failure; one that starts on a rebuilt state serves.
        """
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        moved = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(moved) + suffix))
        restored = 0.0
        if self.backup_path.is_file():
            try:
                backup = _open(self.backup_path)
            except sqlite3.DatabaseError as exc:
                log.warning("state backup %s is unreadable too (%s)", self.backup_path, exc)
            else:
                try:
                    fresh = sqlite3.connect(str(self.path))
                    backup.backup(fresh)
                    fresh.close()
                    restored = self.backup_path.stat().st_mtime
                finally:
                    backup.close()
        return LostState(why, moved, restored)

    def _save_backup(self) -> None:
        """Copy the database to ``<name>.backup`` (whole, then renamed): what a damaged file falls back to."""
        tmp = self.backup_path.with_name(self.backup_path.name + ".tmp")
        try:
            with contextlib.closing(sqlite3.connect(str(tmp))) as dst:
                self._db.backup(dst)
            os.replace(tmp, self.backup_path)
        except (sqlite3.Error, OSError) as exc:  # the state itself is committed; only its spare copy is stale
            log.warning("state backup %s not refreshed: %s", self.backup_path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _storage_error(self, exc: BaseException) -> BaseException:
        if _no_space(exc):
            return NoSpace(f"no space left on the state database ({self.path.name} in tegrad's state directory): "
                           "free some space on that file system and retry")
        if _code(exc) == _SQLITE_READONLY or "readonly database" in str(exc):
            return FailedPrecondition(f"the state database ({self.path.name} in tegrad's state directory) cannot be "
                                      "written (read-only file or file system): make it writable for tegrad's user")
        return exc

    @contextlib.contextmanager
    def _transaction(self, backup: bool = False) -> Iterator[None]:
        # The connection is in autocommit mode (isolation_level=None), where `with connection:`
        # starts no transaction; BEGIN IMMEDIATE makes several statements commit together or not at all.
        if self._db.in_transaction:  # nested: part of the enclosing transaction
            yield
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (disk full): a transaction left open would swallow
                # every later write as "nested" and never commit it.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            err = self._storage_error(exc)
            if err is exc:
                raise
            raise err from None
        if backup:
            self._save_backup()

    def close(self) -> None:
        self._db.close()

    def set_loaded(self, name: str, loaded: bool) -> None:
        with self._transaction(backup=True):
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
        with self._transaction(backup=True):
            old = self.rollout_version(model, version)
            new = replace(old or RolloutVersion(model, version, state), state=state, reason=reason, **changes)
            self._put_version(new)
        if old is None or old.state != state:
            event("version_state", model=model, version=version, old=old.state if old else "", new=state, reason=reason)
        return new

    def commit_activation(self, model: str, version: int, previous: int) -> None:
        """``version`` becomes ACTIVE, the one it replaces INACTIVE, and Rollback points at ``previous``."""
        now = time.time()
        with self._transaction(backup=True):
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
        with self._transaction(backup=True):
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
        with self._transaction(backup=True):
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
