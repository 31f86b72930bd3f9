"""Rollouts that must not happen, and rollouts cut short: over the real admin socket, a device refuses
hostile, damaged, unsigned, oversize and failing bundles, resumes broken uploads, and comes back from a
SIGKILL at each point of a rollout (TEGRAD_CRASH_AT) with the active version untouched.

Every test checks that the version serving requests kept its files (``tree(device.repo)``), its place in
ListModels and its answers through tritonclient.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from daemon.protogen import admin_pb2 as pb
from daemon.rollout import signing
from daemon.rollout.admin_client import state_name
from tests.interop.conftest import ROOT
from tests.interop.rollout_support import (
    Device,
    digits_source,
    heldout_digits,
    make_bundle,
    make_keys,
    op_state,
    push,
    restart,
    start_device,
    strict_validation,
    tree,
    version_states,
    wait_for_exit,
)
from tests.rollout.forge import entry, flip_byte, forge, members, write_tar
from tests.waiting import wait_until

CHUNK = 16384
# A unique name for the files a hostile bundle tries to write, so that finding one proves the escape.
EVIL = f"evil-{uuid.uuid4().hex[:12]}"


# ---- helpers --------------------------------------------------------------------------------------


def _infer(url: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    with grpcclient.InferenceServerClient(url) as c:
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = c.infer("digits", [inp])
        return result.as_numpy("logits"), result.get_response().model_version


def _accuracy(url: str) -> tuple[float, set[str]]:
    """Top-1 accuracy on 200 held-out digits and the versions that answered (requests name no version)."""
    x, y = heldout_digits()
    correct, versions = 0, set()
    for i in range(0, 200, 25):
        logits, version = _infer(url, x[i:i + 25])
        correct += int((logits.argmax(1) == y[i:i + 25]).sum())
        versions.add(version)
    return correct / 200, versions


def _serves(device: Device, version: str = "1") -> None:
    accuracy, versions = _accuracy(device.server.url)
    assert versions == {version} and accuracy >= 0.9, (versions, accuracy)


def _view(admin) -> tuple[int, int, dict[int, tuple[str, str]]]:
    """What ListModels says of digits: active, previous, and each version's rollout and serving state."""
    (m,) = admin.models("digits")
    return (m.active_version, m.previous_version,
            {v.version: (state_name(v.state, pb.VersionState), v.serving_state) for v in m.versions})


def _version(admin, version: int) -> pb.VersionStatus:
    (m,) = admin.models("digits")
    return next(v for v in m.versions if v.version == version)


def _signature(data: bytes, key: Path, claim: Path | None = None) -> bytes:
    """manifest.sig over ``data`` made with ``key``, naming the key id of ``claim`` (default: ``key``)."""
    private = signing.load_private_key(key)
    named = signing.load_private_key(claim) if claim else private
    return signing.encode_signature(signing.key_id(named.public_key()), signing.sign(data, private))


def _retar(src: Path, dst: Path, *, manifest: bytes | None = None, sig: bytes | None | bool = True,
           replace: dict | None = None, extra: list | None = None) -> Path:
    """``src``'s members re-tarred: manifest and signature swapped (``sig=None`` drops it, ``True`` keeps
    it), members replaced by other tar entries, and extra entries appended."""
    out = []
    for info, data in members(src):
        if info.name == "manifest.json" and manifest is not None:
            data = manifest
        if info.name == "manifest.sig" and sig is not True:
            if sig is None:
                continue
            data = sig
        out.append((replace or {}).get(info.name) or entry(info.name, data))
    return write_tar(dst, out + list(extra or []))


def _no_escape(repo: Path, *roots: Path) -> None:
    """No file named EVIL under the repository, ``roots`` or beside the daemon's working directory, and no
    link in the repository."""
    found = [p for root in (repo, *roots) for p in root.rglob(f"*{EVIL}*")]
    found += [p for p in (ROOT / EVIL, ROOT.parent / EVIL, Path("/tmp") / EVIL, Path("/") / EVIL) if os.path.lexists(p)]
    assert not found, found
    links = [p for p in repo.rglob("*") if p.is_symlink()]
    assert not links, links


def _marked(mark: str) -> dict[int, str]:
    """Processes (pid → command line) whose environment holds TEGRAD_TEST_MARK=mark."""
    want = f"TEGRAD_TEST_MARK={mark}".encode()
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop(device: Device) -> None:
    rc = device.server.stop()
    assert rc == 0, f"tegrad exited with {rc} on SIGTERM:\n{device.server.log()}"


# ---- bundles --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return digits_source(tmp_path_factory.mktemp("source"), "int8")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, keys, source) -> Path:
    """A good signed int8 digits v2 bundle: what every forgery below starts from."""
    return make_bundle(source, tmp_path_factory.mktemp("bundle") / "digits-v2.tegrad", 2, keys.signer)


def _tampered(b: Path, out: Path, keys) -> Path:
    shutil.copy(b, out)
    flip_byte(out, "model.onnx", at=5000)
    return out


def _manifest_changed(b: Path, out: Path, keys) -> Path:
    data = dict((m.name, d) for m, d in members(b))["manifest.json"]
    changed = data.replace(b'"created": "2026-01-02T03:04:05Z"', b'"created": "2026-01-02T03:04:06Z"')
    assert changed != data
    return _retar(b, out, manifest=changed)


def _other_bytes(b: Path, out: Path, keys) -> Path:
    return _retar(b, out, sig=_signature(b"not the manifest of this bundle", keys.signer))


def _rogue_claims_signer(b: Path, out: Path, keys) -> Path:
    data = dict((m.name, d) for m, d in members(b))["manifest.json"]
    return _retar(b, out, sig=_signature(data, keys.rogue, claim=keys.signer))


def _untrusted(b: Path, out: Path, keys) -> Path:
    data = dict((m.name, d) for m, d in members(b))["manifest.json"]
    return _retar(b, out, sig=_signature(data, keys.rogue))


def _unsigned(b: Path, out: Path, keys) -> Path:
    return _retar(b, out, sig=None)


def _traversal_unlisted(b: Path, out: Path, keys) -> Path:
    return _retar(b, out, extra=[entry(f"../{EVIL}", b"pwned\n")])


def _traversal_listed(b: Path, out: Path, keys) -> Path:
    """'../EVIL' listed in the manifest with its right hash and size, and the manifest signed by the
    trusted key: only the member-name check stands between it and the file system."""
    payload = b"pwned\n"
    items = dict((m.name, d) for m, d in members(b))
    doc = json.loads(items["manifest.json"])
    doc["members"][f"../{EVIL}"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    data = (json.dumps(doc, indent=2) + "\n").encode()
    return _retar(b, out, manifest=data, sig=_signature(data, keys.signer),
                  extra=[entry(f"../{EVIL}", payload)])


def _newline_listed(b: Path, out: Path, keys) -> Path:
    """A member named 'notes.txt\\n', listed and signed (as version 7, so that a wrongly accepted bundle
    does not take version 2 from the other cases)."""
    payload = b"a newline is not one of the characters of a plain member name\n"
    items = dict((m.name, d) for m, d in members(b))
    doc = json.loads(items["manifest.json"])
    doc["version"] = 7
    doc["members"]["notes.txt\n"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    data = (json.dumps(doc, indent=2) + "\n").encode()
    return _retar(b, out, manifest=data, sig=_signature(data, keys.signer), extra=[entry("notes.txt\n", payload)])


def _absolute(b: Path, out: Path, keys) -> Path:
    return _retar(b, out, extra=[entry(str(out.parent / EVIL), b"pwned\n")])


def _symlink(b: Path, out: Path, keys) -> Path:
    return _retar(b, out, replace={"labels.txt": entry("labels.txt", type_=tarfile.SYMTYPE, linkname="/etc/passwd")})


def _hardlink(b: Path, out: Path, keys) -> Path:
    return _retar(b, out, replace={"labels.txt": entry("labels.txt", type_=tarfile.LNKTYPE, linkname="model.onnx")})


REFUSED = {
    # case: (how the bundle is made, what the operation's error must say)
    "tampered-member": (_tampered, [r"member 'model\.onnx': sha256 \w+… \(97046 bytes\) does not match"]),
    "manifest-changed-after-signing": (_manifest_changed, ["signature does not match the manifest"]),
    "signature-of-other-bytes": (_other_bytes, ["signature does not match the manifest"]),
    "rogue-key-naming-the-trusted-one": (_rogue_claims_signer, ["signature does not match the manifest"]),
    "untrusted-key": (_untrusted, ["signed by unknown key ROGUE"]),
    "unsigned": (_unsigned, ["is not signed"]),
    "traversal-unlisted": (_traversal_unlisted, [f"member '../{EVIL}' points outside the bundle"]),
    "traversal-listed-and-signed": (_traversal_listed, [f"member '../{EVIL}' points outside the bundle"]),
    "absolute-path": (_absolute, [f"/{EVIL}' has an absolute path"]),
    "newline-in-name-listed-and-signed": (_newline_listed, [r"member 'notes\.txt\\n' is not a plain file name"]),
    "symlink": (_symlink, [r"member 'labels\.txt' is a symbolic link \(to '/etc/passwd'\)"]),
    "hardlink": (_hardlink, [r"member 'labels\.txt' is a hard link"]),
}


# ---- refused bundles ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, keys):
    """One device for every refusal: each test compares what it sees before and after its own push."""
    device = start_device(tmp_path_factory.mktemp("guarded"), keys.trust_dir)
    yield device
    _stop(device)


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_or_damaged_bundle_is_refused(case, guarded, bundle, keys, tmp_path):
    make, expected = REFUSED[case]
    hostile = make(bundle, tmp_path / f"{case}.tegrad", keys)
    rogue = signing.key_id(signing.load_private_key(keys.rogue).public_key())
    repo_before = tree(guarded.repo)
    with guarded.admin() as admin:
        view_before = _view(admin)
        op = push(admin, hostile)
        assert op_state(op) == "FAILED", op
        for pattern in expected:
            assert re.search(pattern.replace("ROGUE", rogue), op.error), (pattern, op.error)
        assert _view(admin) == view_before  # no version record, the active version unchanged
    assert tree(guarded.repo) == repo_before
    assert not (guarded.repo / "digits" / "2").exists()
    _no_escape(guarded.repo, guarded.repo.parent, tmp_path)
    _serves(guarded, "1")


def test_bundle_failing_its_golden_samples_is_refused_with_its_report(guarded, keys, source, tmp_path):
    strict = make_bundle(source, tmp_path / "strict.tegrad", 2, keys.signer, validation=strict_validation())
    repo_before = tree(guarded.repo)
    with guarded.admin() as admin:
        active, previous, versions = _view(admin)
        op = push(admin, strict)
        assert op_state(op) == "FAILED" and "cosine" in op.error, op
        assert op.validation.samples == 64 and not op.validation.passed
        # The version is on record as FAILED, with its validation report; nothing else changed.
        assert _view(admin) == (active, previous, {**versions, 2: ("FAILED", "")})
        v2 = _version(admin, 2)
        assert not v2.validation.passed and v2.validation.failures, v2
        assert any("cosine" in f for f in v2.validation.failures), v2.validation.failures
        assert v2.validation.scores["cosine"] < 0.9999999 and v2.reason
        with pytest.raises(grpc.RpcError) as err:
            admin.activate("digits", 2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "FAILED" in err.value.details()
        assert _view(admin) == (active, previous, {**versions, 2: ("FAILED", "")})
    assert not (guarded.repo / "digits" / "2").exists()
    assert tree(guarded.repo) == repo_before
    _serves(guarded, "1")


def test_version_directory_placed_by_hand_is_never_overwritten(guarded, keys, source, bundle, tmp_path):
    """A version that failed staging keeps its record (FAILED); if an operator then puts a directory of
    that version into the repository, a new bundle of the version must be refused before it is built,
    as it is for any version directory the rollout does not own."""
    strict = make_bundle(source, tmp_path / "strict-v3.tegrad", 3, keys.signer, validation=strict_validation())
    good = forge(bundle, tmp_path / "good-v3.tegrad", keys.signer, update={"version": 3})
    hand = guarded.repo / "digits" / "3"
    try:
        with guarded.admin() as admin:
            assert op_state(push(admin, strict)) == "FAILED"
            assert version_states(admin)[3] == "FAILED"
            hand.mkdir()
            shutil.copy(guarded.repo / "digits" / "1" / "model.onnx", hand / "model.onnx")
            repo_before = tree(guarded.repo)
            view_before = _view(admin)
            op = push(admin, good)
            assert op_state(op) == "FAILED", op
            assert "already exists in the repository" in op.error, op.error
            assert "build" not in op.stage_seconds, op.stage_seconds  # refused before any work
            assert _view(admin) == view_before
        assert tree(guarded.repo) == repo_before
        _serves(guarded, "1")
    finally:
        shutil.rmtree(hand, ignore_errors=True)


def test_oversize_bundle_upload_is_refused(tmp_path, keys, bundle):
    device = start_device(tmp_path, keys.trust_dir, args=("--max-bundle-mb", "0.05"))
    try:
        repo_before = tree(device.repo)
        with device.admin() as admin:
            view_before = _view(admin)
            with pytest.raises(grpc.RpcError) as err:
                admin.upload(bundle, chunk=CHUNK)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert f"bundle of {bundle.stat().st_size} bytes is over this device's limit of 52428 bytes" \
                in err.value.details()
            sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
            assert admin.upload_status(sha) is None  # nothing of it was kept
            assert not [p for p in (device.state / "uploads").iterdir() if p.name.startswith(sha)]
            with pytest.raises(grpc.RpcError) as err:
                admin.stage(sha)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert _view(admin) == view_before
        assert tree(device.repo) == repo_before
        _serves(device, "1")
    finally:
        _stop(device)


def test_unsigned_bundle_is_accepted_only_with_allow_unsigned(tmp_path, keys, bundle):
    unsigned = _unsigned(bundle, tmp_path / "unsigned.tegrad", keys)
    device = start_device(tmp_path, keys.trust_dir, args=("--allow-unsigned",))
    try:
        assert "ALLOW-UNSIGNED" in device.server.log()  # loud at startup already
        repo_before = tree(device.repo)
        with device.admin() as admin:
            op = push(admin, unsigned)
            assert op_state(op) == "SUCCEEDED", op.error
            assert version_states(admin) == {1: "ACTIVE", 2: "STAGED"}
            assert _version(admin, 2).signer == ""  # on record as unverified
            assert admin.models("digits")[0].active_version == 0
        warnings = [line for line in device.server.lines if "WARNING" in line and "UNVERIFIED" in line]
        assert warnings and "--allow-unsigned" in warnings[0], device.server.log()
        # The active version's files are untouched; only digits/2 was added.
        after = tree(device.repo)
        assert {k: v for k, v in after.items() if not k.startswith("digits/2/")} == repo_before
        assert "digits/2/model.onnx" in after
        _serves(device, "1")
    finally:
        _stop(device)


# ---- uploads --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uploading(tmp_path_factory, keys):
    device = start_device(tmp_path_factory.mktemp("uploading"), keys.trust_dir)
    yield device
    _stop(device)


def _chunk(sha: str, total: int, offset: int, data: bytes) -> pb.UploadChunk:
    return pb.UploadChunk(sha256=sha, total_size=total, offset=offset, data=data)


def test_truncated_upload_resumes_and_stages(uploading, bundle):
    data = bundle.read_bytes()
    sha, total = hashlib.sha256(data).hexdigest(), len(data)
    assert total > 3 * CHUNK
    repo_before = tree(uploading.repo)
    with uploading.admin() as admin:
        view_before = _view(admin)
        status = admin.upload(bundle, chunk=CHUNK, stop_after=2 * CHUNK)
        assert (status.complete, status.received, status.total_size) == (False, 2 * CHUNK, total)
        got = admin.upload_status(sha)
        assert (got.complete, got.received, got.total_size) == (False, 2 * CHUNK, total)
        # An incomplete upload cannot be staged.
        with pytest.raises(grpc.RpcError) as err:
            admin.stage(sha)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"resume from offset {2 * CHUNK}" in err.value.details()

        # Chunks at the wrong offset (behind, ahead) are refused with the offset to resume from.
        for offset in (0, CHUNK, 3 * CHUNK):
            with pytest.raises(grpc.RpcError) as err:
                admin.stub.Upload(iter([_chunk(sha, total, offset, data[offset:offset + CHUNK])]), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert f"resume from offset {2 * CHUNK}, not {offset}" in err.value.details()
        # The same upload with another total size.
        with pytest.raises(grpc.RpcError) as err:
            admin.stub.Upload(iter([_chunk(sha, total + 1, 2 * CHUNK, data[2 * CHUNK:3 * CHUNK])]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"started with total_size {total}, not {total + 1}" in err.value.details()
        # A chunk past the end.
        with pytest.raises(grpc.RpcError) as err:
            admin.stub.Upload(iter([_chunk(sha, total, 2 * CHUNK, data[2 * CHUNK:] + b"x")]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "goes past total_size" in err.value.details()
        # None of the refused chunks changed what the device holds.
        got = admin.upload_status(sha)
        assert (got.complete, got.received, got.total_size) == (False, 2 * CHUNK, total)

        status = admin.upload(bundle, chunk=CHUNK)
        assert (status.complete, status.received, status.total_size) == (True, total, total)
        assert admin.upload_status(sha).complete
        op = admin.wait(admin.stage(sha).id)
        assert op_state(op) == "SUCCEEDED", op.error
        active, previous, versions = view_before
        assert _view(admin) == (active, previous, {**versions, 2: ("STAGED", "")})
    after = tree(uploading.repo)
    assert {k: v for k, v in after.items() if not k.startswith("digits/2/")} == repo_before
    shipped = dict((m.name, d) for m, d in members(bundle))["model.onnx"]
    assert after["digits/2/model.onnx"] == hashlib.sha256(shipped).hexdigest()
    _serves(uploading, "1")


def test_upload_whose_bytes_do_not_match_its_sha256_is_deleted(uploading, bundle):
    data = bundle.read_bytes()
    wrong = hashlib.sha256(b"some other bundle").hexdigest()
    repo_before = tree(uploading.repo)
    with uploading.admin() as admin:
        view_before = _view(admin)
        chunks = [_chunk(wrong if i == 0 else "", len(data) if i == 0 else 0, i, data[i:i + CHUNK])
                  for i in range(0, len(data), CHUNK)]
        with pytest.raises(grpc.RpcError) as err:
            admin.stub.Upload(iter(chunks), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert f"not the expected {wrong[:16]}" in err.value.details()
        assert admin.upload_status(wrong) is None
        assert not [p for p in (uploading.state / "uploads").iterdir() if p.name.startswith(wrong)]
        # Names that are not a sha256 are refused outright.
        with pytest.raises(grpc.RpcError) as err:
            admin.stub.GetUpload(pb.GetUploadRequest(sha256="../../etc/passwd"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            admin.stub.Upload(iter([_chunk("../" + wrong[3:], len(data), 0, data[:CHUNK])]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _view(admin) == view_before
    assert tree(uploading.repo) == repo_before
    _serves(uploading, "1")


# ---- crashes --------------------------------------------------------------------------------------


def _crashing(root: Path, keys, point: str) -> tuple[Device, str]:
    mark = uuid.uuid4().hex
    device = start_device(root, keys.trust_dir, env={"TEGRAD_CRASH_AT": point, "TEGRAD_TEST_MARK": mark})
    return device, mark


def _killed(device: Device, point: str) -> None:
    assert wait_for_exit(device, 60) == -9, device.server.log()
    assert f"TEGRAD_CRASH_AT={point}: killing tegrad with SIGKILL at '{point}'" in device.server.log()


@pytest.mark.parametrize("chunk", [CHUNK, 1 << 20], ids=["first-chunk", "every-byte-not-yet-hashed"])
def test_crash_during_upload_resumes_after_restart(tmp_path, keys, bundle, chunk):
    data = bundle.read_bytes()
    sha, total = hashlib.sha256(data).hexdigest(), len(data)
    device, _ = _crashing(tmp_path, keys, "upload")
    repo_before = tree(device.repo)
    try:
        with device.admin() as admin, pytest.raises(grpc.RpcError) as err:
            admin.upload(bundle, chunk=chunk, retries=0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        _killed(device, "upload")
        device = restart(device)
        with device.admin() as admin:
            got = admin.upload_status(sha)
            assert got is not None, "the bytes received before the kill were lost"
            assert (got.complete, got.received, got.total_size) == (False, min(chunk, total), total)
            status = admin.upload(bundle, chunk=CHUNK)
            assert (status.complete, status.received) == (True, total)
            assert (device.state / "uploads" / f"{sha}.tegrad").read_bytes() == data
            assert version_states(admin) == {1: "ACTIVE"}
        assert tree(device.repo) == repo_before
        _serves(device, "1")
    finally:
        device.server.stop()


@pytest.mark.parametrize("point", ["build", "validate"])
def test_crash_while_staging_fails_the_version_and_leaves_no_files(tmp_path, keys, bundle, point):
    device, mark = _crashing(tmp_path, keys, point)
    repo_before = tree(device.repo)
    try:
        with device.admin() as admin:
            sha = admin.upload(bundle).sha256
            op = admin.stage(sha)
            with pytest.raises(grpc.RpcError) as err:
                admin.wait(op.id)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        _killed(device, point)
        # Caught in the act: the bundle's files are extracted under .staging, nothing in digits/.
        orphans = _marked(mark)
        assert [p for p in (device.repo / ".staging").rglob("model.onnx")], tree(device.repo)
        assert not (device.repo / "digits" / "2").exists()
        # Build workers (and multiprocessing's helper) die with the daemon: none outlives it.
        # The staging build's pid is not logged (its progress goes to the operation only); it is found by
        # the mark in its environment. At "build" it is still starting when the daemon dies.
        spawned = {pid for pid, cmd in orphans.items() if "spawn_main" in cmd}
        assert spawned or point != "build", orphans
        workers = spawned | {int(p) for p in re.findall(r"worker pid (\d+)", device.server.log())}
        wait_until(lambda: all(_gone(pid) for pid in workers), timeout=5)
        wait_until(lambda: not _marked(mark), timeout=10)

        device = restart(device)
        with device.admin() as admin:
            assert version_states(admin) == {1: "ACTIVE", 2: "FAILED"}
            assert admin.models("digits")[0].active_version == 0
            v2 = _version(admin, 2)
            assert "restart" in v2.reason and "stage the bundle again" in v2.reason, v2.reason
            (failed,) = [o for o in admin.operations() if o.id == op.id]
            assert op_state(failed) == "FAILED" and "restart" in failed.error, failed
            assert not (device.repo / "digits" / "2").exists()
            assert tree(device.repo) == repo_before  # .staging emptied too
            assert not any((device.state / "engines" / "tmp").iterdir())  # nor build scratch left behind
            _serves(device, "1")

            # The upload was kept: the same bundle goes through now.
            assert admin.upload_status(sha).complete
            op = push(admin, bundle)
            assert op_state(op) == "SUCCEEDED", op.error
            assert version_states(admin) == {1: "ACTIVE", 2: "STAGED"}
            assert admin.upload_status(sha) is None  # discarded once staged
        after = tree(device.repo)
        assert {k: v for k, v in after.items() if not k.startswith("digits/2/")} == repo_before
        _serves(device, "1")
    finally:
        device.server.stop()


def test_crash_at_install_removes_the_unrecorded_version(tmp_path, keys, bundle):
    device, _ = _crashing(tmp_path, keys, "install")
    repo_before = tree(device.repo)
    try:
        with device.admin() as admin, pytest.raises(grpc.RpcError) as err:
            push(admin, bundle)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        _killed(device, "install")
        assert (device.repo / "digits" / "2" / "model.onnx").is_file()  # renamed in, never recorded STAGED

        device = restart(device)
        with device.admin() as admin:
            assert version_states(admin) == {1: "ACTIVE", 2: "FAILED"}
            assert "restart" in _version(admin, 2).reason
            assert admin.models("digits")[0].active_version == 0
            with pytest.raises(grpc.RpcError) as err:
                admin.activate("digits", 2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert not (device.repo / "digits" / "2").exists()
        assert tree(device.repo) == repo_before
        _serves(device, "1")
    finally:
        device.server.stop()


def test_crash_during_activation_leaves_the_previous_version_active(tmp_path, keys, bundle):
    device, _ = _crashing(tmp_path, keys, "activate")
    repo_before = tree(device.repo)
    try:
        with device.admin() as admin, pytest.raises(grpc.RpcError) as err:
            push(admin, bundle, activate=True)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        _killed(device, "activate")

        device = restart(device)
        after = tree(device.repo)
        assert {k: v for k, v in after.items() if not k.startswith("digits/2/")} == repo_before
        _serves(device, "1")  # requests that name no version
        with device.admin() as admin:
            assert version_states(admin) == {1: "ACTIVE", 2: "STAGED"}
            assert "restart" in _version(admin, 2).reason
            m = admin.models("digits")[0]
            assert (m.active_version, m.previous_version) == (1, 0), m
            m = admin.activate("digits", 2)
            assert (m.active_version, m.previous_version) == (2, 1)
            assert version_states(admin) == {1: "INACTIVE", 2: "ACTIVE"}
        _serves(device, "2")
    finally:
        device.server.stop()
