"""Rollouts over the real admin socket: push → stage → validate → activate → rollback of an int8
digits version beside the default fp32 one, with tritonclient serving throughout."""

from __future__ import annotations

import json
import os
import stat
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.interop.rollout_support import (
    digits_source,
    heldout_digits,
    make_bundle,
    make_keys,
    op_state,
    push,
    restart,
    start_device,
    version_states,
)
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("bundles")
    return make_bundle(digits_source(root, "int8"), root / "digits-v2-int8.tegrad", 2, keys.signer)


def _infer(url: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    with grpcclient.InferenceServerClient(url) as c:
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = c.infer("digits", [inp])
        return result.as_numpy("logits"), result.get_response().model_version


def _accuracy(url: str) -> tuple[float, str]:
    x, y = heldout_digits()
    logits, version = _infer(url, x[:8])
    correct = 0
    for i in range(0, 200, 8):
        logits, version = _infer(url, x[i:i + 8])
        correct += int((logits.argmax(1) == y[i:i + 8]).sum())
    return correct / 200, version


def _metrics(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def test_push_stage_activate_rollback(tmp_path, keys, int8_bundle):
    device = start_device(tmp_path, keys.trust_dir)
    try:
        with device.admin() as admin:
            op = push(admin, int8_bundle)
            assert op_state(op) == "SUCCEEDED", op.error
            assert (op.model, op.version) == ("digits", 2)
            assert op.validation.passed and op.validation.scores["top1_agreement"] >= 0.99
            assert set(op.stage_seconds) == {"verify", "extract", "build", "validate"}
            # Staged is not active: requests that name no version still get version 1.
            assert version_states(admin) == {1: "ACTIVE", 2: "STAGED"}
            assert _accuracy(device.server.url)[1] == "1"
            (m,) = admin.models("digits")
            v2 = next(v for v in m.versions if v.version == 2)
            assert v2.precision == "int8" and v2.engine_id and v2.calibration_cache_id and v2.signer
            assert v2.validation.scores["cosine"] > 0.99

            m = admin.activate("digits", 2)
            assert (m.active_version, m.previous_version) == (2, 1)
            accuracy, version = _accuracy(device.server.url)
            assert version == "2" and accuracy >= 0.9
            text = _metrics(device.server)
            assert 'tegrad_model_active_version{model="digits"} 2.0' in text
            assert 'tegrad_validation_score{metric="top1_agreement",model="digits",version="2"} 1.0' in text
            assert 'tegrad_model_info{backend="onnxruntime",calibration_cache_id=' in text and 'precision="int8"' in text
            builds = _builds(text)

            m = admin.rollback("digits")
            assert (m.active_version, m.previous_version) == (1, 2)
            assert version_states(admin) == {1: "ACTIVE", 2: "INACTIVE"}
            assert _accuracy(device.server.url)[1] == "1"
            # Instant: from the cached engine, nothing rebuilt.
            assert _builds(_metrics(device.server)) == builds
            for line in device.server.lines:
                if "tegrad.events" in line:
                    json.loads(line.split("tegrad.events: ", 1)[1])  # each state change is one JSON line

        # The choice survives a restart, and so does the way back.
        device = restart(device)
        with device.admin() as admin:
            assert version_states(admin) == {1: "ACTIVE", 2: "INACTIVE"}
            assert admin.activate("digits", 2).active_version == 2
        assert _accuracy(device.server.url)[1] == "2"
        assert "built onnxruntime" not in device.server.log(), "activation after a restart rebuilt the engine"
    finally:
        device.server.stop()


def _builds(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tegrad_engine_builds_total{"))


def test_inference_never_fails_through_a_rollout_and_a_rollback(tmp_path, keys, int8_bundle):
    device = start_device(tmp_path, keys.trust_dir)
    x, y = heldout_digits()
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {}
    count = [0]

    def loop() -> None:
        with grpcclient.InferenceServerClient(device.server.url) as c:
            inp = grpcclient.InferInput("input", [8, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[:8])
            while not stop.is_set():
                try:
                    r = c.infer("digits", [inp])
                    v = r.get_response().model_version
                    seen[v] = seen.get(v, 0) + 1
                    if (r.as_numpy("logits").argmax(1) == y[:8]).mean() < 0.75:
                        failures.append(f"wrong answers from version {v}")
                except Exception as exc:  # every failure counts, whatever its type
                    failures.append(repr(exc))
                count[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with device.admin() as admin:
            assert op_state(push(admin, int8_bundle, activate=True)) == "SUCCEEDED"
            wait_until(lambda: seen.get("2", 0) > 20)
            admin.rollback("digits")
            n = seen.get("1", 0)
            wait_until(lambda: seen.get("1", 0) > n + 20)
            admin.rollback("digits")
            n = seen.get("2", 0)
            wait_until(lambda: seen.get("2", 0) > n + 20)
    finally:
        stop.set()
        for t in threads:
            t.join()
        device.server.stop()
    assert failures == [], failures[:5]
    assert count[0] > 100 and seen.get("1") and seen.get("2"), seen


def test_admin_socket_is_owner_only_and_apart_from_inference(tmp_path, keys):
    device = start_device(tmp_path, keys.trust_dir)
    try:
        mode = stat.S_IMODE(os.stat(device.socket).st_mode)
        assert stat.S_ISSOCK(os.stat(device.socket).st_mode) and mode == 0o600, oct(mode)
        # The inference port does not serve the admin API.
        from daemon.rollout.admin_client import AdminClient

        with AdminClient(device.server.url) as wrong, pytest.raises(grpc.RpcError) as err:
            wrong.models()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        device.server.stop()


def test_retention_keeps_the_last_versions_and_their_engines(tmp_path, keys):
    root = tmp_path / "b"
    src = digits_source(root, "int8")
    bundles = [make_bundle(src, root / f"v{v}.tegrad", v, keys.signer) for v in (2, 3)]
    device = start_device(tmp_path, keys.trust_dir, args=("--keep-versions", "2"))
    try:
        with device.admin() as admin:
            for b in bundles:
                assert op_state(push(admin, b, activate=True)) == "SUCCEEDED"
            # v1 (the repository's) fell out of the last two active versions: its files are gone.
            assert version_states(admin) == {2: "INACTIVE", 3: "ACTIVE"}
            assert not (device.repo / "digits" / "1").exists() and (device.repo / "digits" / "2").is_dir()
            assert admin.rollback("digits").active_version == 2
            with pytest.raises(grpc.RpcError) as err:
                admin.delete("digits", 2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            admin.delete("digits", 3)
            assert version_states(admin) == {2: "ACTIVE"}
            assert not (device.repo / "digits" / "3").exists()
        # Engines of deleted versions left the cache: v2's int8 engine (shared by v3: same model,
        # cache and precision) stays because v2 uses it.
        entries = [p for p in (device.state / "engines" / "entries").iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1, entries
    finally:
        device.server.stop()


def test_dropbox_stages_and_activates_dropped_bundles(tmp_path, keys, int8_bundle):
    box = tmp_path / "box"
    device = start_device(tmp_path, keys.trust_dir, args=("--dropbox", str(box), "--auto-activate"))
    try:
        (box / "digits-v2.tegrad.partial").write_bytes(int8_bundle.read_bytes())
        os.rename(box / "digits-v2.tegrad.partial", box / "digits-v2.tegrad")
        result = box / "results" / "digits-v2.tegrad.result.json"
        wait_until(result.exists, timeout=60)
        doc = json.loads(result.read_text())
        assert doc["state"] == "SUCCEEDED" and doc["version"] == 2, doc
        assert not (box / "digits-v2.tegrad").exists()
        with device.admin() as admin:
            assert admin.models("digits")[0].active_version == 2
        assert _accuracy(device.server.url)[1] == "2"
    finally:
        device.server.stop()


def test_embedded_repository_takes_no_bundles(tmp_path, keys, int8_bundle):
    from tests.interop.conftest import start_server
    from tests.interop.rollout_support import short_dir

    sock = short_dir() / "admin.sock"
    server = start_server(state_dir=tmp_path / "state", args=("--admin-socket", str(sock), "--trust-dir",
                                                              str(keys.trust_dir)))
    try:
        from daemon.rollout.admin_client import AdminClient

        with AdminClient(f"unix:{sock}") as admin:
            status = admin.upload(int8_bundle)
            with pytest.raises(grpc.RpcError) as err:
                admin.stage(status.sha256)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-repository" in err.value.details()
    finally:
        server.stop()


def _certificates(root):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer_name, issuer_key, *, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (root / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (root / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        return key

    ca_key = issue("ca", "ca", None, ca=True)
    issue("server", "ca", ca_key, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    issue("client", "ca", ca_key)
    return root


def test_admin_over_tcp_needs_a_client_certificate(tmp_path, keys):
    import re
    import subprocess
    import sys

    from daemon.rollout.admin_client import AdminClient
    from tests.interop.conftest import ROOT

    pki = _certificates(tmp_path)
    # Without TLS material the daemon refuses to open TCP for the admin API at all.
    plain = subprocess.run([sys.executable, "-m", "daemon", "serve", "--state-dir", str(tmp_path / "s0"),
                            "--grpc-port", "0", "--metrics-port", "0", "--admin-socket", "",
                            "--admin-listen", "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "only with TLS and client certificates" in plain.stderr

    device = start_device(tmp_path, keys.trust_dir, args=(
        "--admin-listen", "127.0.0.1:0", "--admin-tls-cert", str(pki / "server.pem"),
        "--admin-tls-key", str(pki / "server.key"), "--admin-client-ca", str(pki / "ca.pem")))
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+) \(TLS", device.server.log()).group(1))
        with AdminClient(f"127.0.0.1:{port}", ca=pki / "ca.pem", cert=pki / "client.pem",
                         key=pki / "client.key") as admin:
            assert admin.models("digits")[0].name == "digits"
        # TLS without a client certificate: the handshake fails.
        channel = grpc.secure_channel(f"127.0.0.1:{port}",
                                      grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()))
        from daemon.protogen import admin_pb2, admin_pb2_grpc

        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminStub(channel).ListModels(admin_pb2.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        device.server.stop()
