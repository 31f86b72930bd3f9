"""Rollout state in real SQLite, uploads on real files, and the operation board's watchers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from daemon.protogen import admin_pb2 as pb
from daemon.repository.state import ACTIVATING, ACTIVE, FAILED, INACTIVE, STAGED, STAGING, StateStore
from daemon.rollout.operations import FAILED as OP_FAILED
from daemon.rollout.operations import SUCCEEDED, VERIFYING, OperationBoard
from daemon.rollout.uploads import Uploads


@pytest.fixture()
def store(tmp_path):
    s = StateStore(tmp_path / "state.sqlite3")
    yield s
    s.close()


def test_activation_commits_active_and_previous_together(store, tmp_path):
    store.set_rollout_state("m", 1, ACTIVE)
    store.commit_activation("m", 1, 0)
    store.set_rollout_state("m", 2, STAGED)
    store.set_rollout_state("m", 2, ACTIVATING)
    store.commit_activation("m", 2, 1)
    assert store.rollout_model("m") == (2, 1)
    states = {v.version: v.state for v in store.rollout_versions("m")}
    assert states == {1: INACTIVE, 2: ACTIVE}
    again = StateStore(tmp_path / "state.sqlite3")
    assert again.rollout_model("m") == (2, 1) and again.rollout_version("m", 2).activated > 0
    again.close()


def test_a_failed_statement_rolls_the_whole_transaction_back(store):
    store.set_rollout_state("m", 1, ACTIVE)
    store.commit_activation("m", 1, 0)
    with pytest.raises(sqlite3.OperationalError), store._transaction():
        store._db.execute("UPDATE rollout_models SET active=7 WHERE model='m'")
        store._db.execute("INSERT INTO no_such_table VALUES (1)")
    assert store.rollout_model("m") == (1, 0)


def test_recover_fails_interrupted_work_and_keeps_the_committed_active_version(store, tmp_path):
    store.set_rollout_state("m", 1, ACTIVE)
    store.commit_activation("m", 1, 0)
    store.set_rollout_state("m", 2, STAGING)
    store.set_rollout_state("m", 3, STAGED)
    store.set_rollout_state("m", 3, ACTIVATING)
    board = OperationBoard(store)
    op = board.create("stage", upload_sha256="ab" * 32)
    board.update(op.id, state=VERIFYING)

    done = StateStore(tmp_path / "state.sqlite3").recover()  # a fresh start after a kill

    assert [v.version for v in done.staging] == [2] and [v.version for v in done.activating] == [3]
    assert store.rollout_model("m") == (1, 0)
    states = {v.version: (v.state, v.reason) for v in store.rollout_versions("m")}
    assert states[1] == (ACTIVE, "")
    assert states[2][0] == FAILED and "restart" in states[2][1]
    assert states[3][0] == STAGED and "activation interrupted" in states[3][1]
    (op,) = store.operations()
    assert op.state == OP_FAILED and op.done and "verifying" in op.error


class _Stream:
    """An Upload request stream as grpc.aio hands it over: an async iterator of UploadChunk."""

    def __init__(self, chunks):
        self._chunks = list(chunks)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)


def _chunks(data: bytes, sha: str, start: int = 0, size: int = 100, total: int | None = None):
    out = []
    for off in range(start, len(data), size):
        out.append(pb.UploadChunk(sha256=sha if off == start else "", total_size=total or len(data) if off == start else 0,
                                  offset=off, data=data[off:off + size]))
    return out


def _receive(uploads, chunks):
    return asyncio.run(uploads.receive(_Stream(chunks)))


def test_upload_resumes_from_what_the_device_holds(tmp_path):
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    uploads = Uploads(tmp_path / "up", max_bytes=10_000)
    first = _receive(uploads, _chunks(data, sha)[:4])
    assert (first.received, first.complete) == (400, False)
    assert Uploads(tmp_path / "up", max_bytes=10_000).state(sha).received == 400  # survives a restart
    with pytest.raises(FailedPrecondition, match="resume from offset 400"):
        _receive(uploads, _chunks(data, sha, start=300))
    with pytest.raises(InvalidArgument, match="total_size 1000"):
        _receive(uploads, _chunks(data, sha, start=400, total=999))
    done = _receive(uploads, _chunks(data, sha, start=400))
    assert done.complete and uploads.bundle_path(sha).read_bytes() == data
    assert _receive(uploads, _chunks(data, sha)).complete  # sending it again costs nothing


def test_upload_that_does_not_hash_to_its_name_is_deleted(tmp_path):
    data = os.urandom(500)
    wrong = hashlib.sha256(b"something else").hexdigest()
    uploads = Uploads(tmp_path / "up", max_bytes=10_000)
    with pytest.raises(InvalidArgument, match="hash to"):
        _receive(uploads, _chunks(data, wrong))
    with pytest.raises(NotFound):
        uploads.state(wrong)
    assert list((tmp_path / "up").iterdir()) == []


def test_upload_limits(tmp_path):
    uploads = Uploads(tmp_path / "up", max_bytes=100)
    sha = "cd" * 32
    with pytest.raises(ResourceExhausted, match="over this device's limit"):
        _receive(uploads, [pb.UploadChunk(sha256=sha, total_size=101, offset=0, data=b"x")])
    with pytest.raises(InvalidArgument, match="sha256"):
        _receive(uploads, [pb.UploadChunk(sha256="../../etc/passwd", total_size=10, offset=0, data=b"x")])
    with pytest.raises(InvalidArgument, match="goes past"):
        _receive(uploads, [pb.UploadChunk(sha256=sha, total_size=10, offset=0, data=b"x" * 11)])
    with pytest.raises(FailedPrecondition, match="holds 0 of 10 bytes"):
        uploads.bundle_path(sha)


def test_watchers_see_the_current_state_then_every_change(store):
    board = OperationBoard(store)

    async def scenario():
        op = board.create("stage", model="m")
        seen = []

        async def watch():
            async for o in board.watch(op.id):
                seen.append(o.state)

        task = asyncio.ensure_future(watch())
        await asyncio.sleep(0)
        board.update(op.id, state=VERIFYING)
        board.update(op.id, state=SUCCEEDED)
        await asyncio.wait_for(task, 5)  # ends by itself once the operation is done
        return seen

    assert asyncio.run(scenario()) == ["QUEUED", "VERIFYING", "SUCCEEDED"]
    assert board.list("m")[0].done and board.list("other") == []


def test_only_the_latest_finished_operations_are_kept(store, monkeypatch):
    from daemon.rollout import operations

    monkeypatch.setattr(operations, "KEEP_DONE", 3)
    board = OperationBoard(store)
    ids = []
    for _ in range(5):
        op = board.create("stage")
        board.update(op.id, state=SUCCEEDED)
        ids.append(op.id)
    running = board.create("stage")
    assert [op.id for op in store.operations()] == ids[2:] + [running.id]
    with pytest.raises(NotFound):
        board.get(ids[0])


def _rollouts(root, store):
    from pathlib import Path

    from daemon.rollout.controller import RolloutOptions, Rollouts

    # recover() touches neither the model manager nor the engine factory.
    return Rollouts(Path(root), store, None, None, Uploads(Path(root) / ".uploads", 1 << 20), OperationBoard(store),
                    RolloutOptions(trust_dir=None))


@pytest.mark.parametrize("backup", [True, False], ids=["with-backup", "without-backup"])
def test_lost_state_is_rebuilt_from_the_backup_and_the_repository(tmp_path, caplog, backup):
    repo, db = tmp_path / "repo", tmp_path / "state" / "state.sqlite3"
    for version in (1, 2, 3):  # 1 placed by hand, 2 and 3 installed from bundles (they carry a manifest)
        (repo / "m" / str(version)).mkdir(parents=True)
        if version > 1:
            (repo / "m" / str(version) / "manifest.json").write_text("{}")
    store = StateStore(db)
    store.set_rollout_state("m", 2, STAGED)
    store.set_rollout_state("m", 2, ACTIVATING)
    store.commit_activation("m", 2, 0)
    store.close()
    if not backup:
        os.unlink(str(db) + ".backup")
    db.write_bytes(os.urandom(4096))

    again = StateStore(db)
    with caplog.at_level("ERROR", logger="tegrad.rollout"):
        _rollouts(repo, again).recover()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1, lines
    states = {v.version: v.state for v in again.rollout_versions("m")}
    if backup:
        assert again.rollout_model("m")[0] == 2
        assert states == {2: ACTIVE, 3: STAGED}  # 3 came after the backup: held back, not served on a guess
        assert "restored the copy saved at" in lines[0] and "active versions now: m version 2" in lines[0]
    else:
        assert again.rollout_model("m") == (0, 0)
        assert states == {2: STAGED, 3: STAGED}
        assert "which versions were active are lost" in lines[0]
    assert "m version 3" in lines[0].split("recorded again as STAGED:")[1]
    again.close()
