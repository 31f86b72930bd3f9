import os
import socket

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
