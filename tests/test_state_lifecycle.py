import os
import socket
import sqlite3

import pytest

from daemon.errors import FailedPrecondition
from daemon.repository.state import StateStore
from daemon.server.lifecycle import sd_notify, watchdog_interval


def test_state_survives_reopen(tmp_path):
    db = tmp_path / "state" / "state.sqlite3"
    store = StateStore(db)
    store.set_loaded("a", True)
    store.set_loaded("b", True)
    store.set_loaded("b", False)
    store.set_version_state("a", 1, "READY", engine_id="abc")
    store.set_version_state("a", 2, "UNAVAILABLE", "bad file")
    store.close()
    again = StateStore(db)
    assert again.loaded_models() == ["a"]
    assert again.version_states("a") == {("a", 1): ("READY", ""), ("a", 2): ("UNAVAILABLE", "bad file")}


def test_sd_notify_sends_datagram(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1\nSTATUS=serving")
        assert sock.recv(256) == b"READY=1\nSTATUS=serving"


def test_sd_notify_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None


def _damage(path, how):
    data = path.read_bytes()
    if how == "random bytes":
        path.write_bytes(os.urandom(len(data)))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header zeroed":
        path.write_bytes(b"\0" * 100 + data[100:])
    elif how == "emptied":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["random bytes", "truncated", "header zeroed", "emptied"])
def test_damaged_database_is_moved_aside_and_restored_from_its_backup(tmp_path, how):
    db = tmp_path / "state.sqlite3"
    store = StateStore(db)
    for i in range(40):  # several pages, so that truncation cuts into the tables
        store.set_rollout_state("digits", i + 1, "INACTIVE", "r" * 400)
    store.commit_activation("digits", 7, 3)
    store.set_loaded("digits", True)
    store.close()
    _damage(db, how)
    damaged = db.read_bytes()

    again = StateStore(db)
    assert again.lost is not None and again.lost.restored > 0
    assert again.lost.moved_to.name.startswith("state.sqlite3.damaged-")
    assert again.lost.moved_to.read_bytes() == damaged  # kept for a post-mortem, unchanged
    assert again.rollout_model("digits") == (7, 3)
    assert len(again.rollout_versions("digits")) == 40
    assert again.loaded_models() == ["digits"]
    again.set_loaded("other", True)  # the rebuilt database takes writes
    again.close()
    assert StateStore(db).lost is None


def test_damaged_database_without_backup_starts_empty(tmp_path):
    db = tmp_path / "state.sqlite3"
    store = StateStore(db)
    store.set_loaded("digits", True)
    store.close()
    (tmp_path / "state.sqlite3.backup").unlink()
    db.write_bytes(os.urandom(8192))
    again = StateStore(db)
    assert again.lost is not None and again.lost.restored == 0
    assert "not a database" in again.lost.why
    assert again.loaded_models() == []


def test_a_sound_database_is_never_moved_aside(tmp_path):
    db = tmp_path / "state.sqlite3"
    first = StateStore(db)
    first.set_loaded("a", True)
    first.close()
    # Another process holds it: a passing condition, not damage.
    holder = sqlite3.connect(str(db), timeout=0)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("INSERT INTO models(name, loaded, updated) VALUES ('held', 1, 0)")
    try:
        with pytest.raises(FailedPrecondition, match="database is locked .is another tegrad using this state"):
            StateStore(db)
    finally:
        holder.close()
    assert [p.name for p in tmp_path.iterdir() if "damaged" in p.name] == []
    assert StateStore(db).loaded_models() == ["a"]


def test_a_failed_commit_leaves_no_transaction_open(tmp_path):
    """A commit that fails (disk full) must not leave the connection inside the transaction, where
    every later write would count as nested and never commit."""
    db = tmp_path / "state.sqlite3"
    store = StateStore(db)
    with pytest.raises(RuntimeError), store._transaction():
        store.set_loaded("a", True)
        raise RuntimeError("write failed")
    assert not store._db.in_transaction
    store.set_loaded("b", True)
    assert StateStore(db).loaded_models() == ["b"]
