"""Bundles end to end on real files: the digits model, real keys, hand-made hostile tars."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.rollout import BundleError, cli, signing
from daemon.rollout.bundle import open_bundle, parse_manifest, read_manifest
from daemon.rollout.make import create, sign_bundle
from tests.rollout.forge import entry as _entry
from tests.rollout.forge import flip_byte as _flip_byte
from tests.rollout.forge import forge as _forge
from tests.rollout.forge import members as _members
from tests.rollout.forge import write_tar as _write_tar

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"
CREATED = "2026-01-02T03:04:05Z"


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rollout")


@pytest.fixture(scope="module")
def digits_dir(work) -> Path:
    d = work / "digits"
    (d / "1").mkdir(parents=True)
    for name in ("config.toml", "calib.json", "labels.txt"):
        shutil.copy(DIGITS / name, d / name)
    shutil.copy(DIGITS / "1" / "model.onnx", d / "1" / "model.onnx")
    return d


@pytest.fixture(scope="module")
def golden_x() -> np.ndarray:
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        return (z["x"][:16].astype(np.float32) / 16).reshape(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def keys(work):
    """(private key of a trusted signer, trust store, private key nobody trusts)."""
    key, _, _ = signing.generate_keypair(work / "signer", "fleet")
    trust_dir = work / "trusted"
    trust_dir.mkdir()
    shutil.copy(work / "signer" / "fleet.pub", trust_dir / "fleet.pub")
    rogue, _, _ = signing.generate_keypair(work / "rogue", "rogue")
    return key, signing.TrustStore(trust_dir), rogue


def _make(digits_dir, golden_x, out, **kw) -> Path:
    create(digits_dir, out, calibration_cache=digits_dir / "calib.json", golden_inputs=golden_x,
           created=CREATED, **kw)
    return out


@pytest.fixture(scope="module")
def signed(work, digits_dir, golden_x, keys) -> Path:
    path = _make(digits_dir, golden_x, work / "digits.tegrad")
    sign_bundle(path, keys[0])
    return path


@pytest.fixture()
def bundle_copy(signed, tmp_path) -> Path:
    return Path(shutil.copy(signed, tmp_path / "copy.tegrad"))


@pytest.fixture()
def install(tmp_path) -> Path:
    d = tmp_path / "install"
    d.mkdir()
    return d


# ---- helpers -------------------------------------------------------------------------------------
def _assert_nothing_written(install) -> None:
    assert list(install.iterdir()) == [], "a refused bundle left files behind"


# ---- round trip ----------------------------------------------------------------------------------
def test_create_inspect_verify_round_trip(signed, keys, golden_x, digits_dir, work, install):
    info = read_manifest(signed)
    m = info.manifest
    assert (m.model, m.version, m.precision, m.calibration_cache) == ("digits", 1, "fp32", "calib.json")
    assert list(m.members) == ["model.onnx", "config.toml", "calib.json", "labels.txt", "golden.npz"]
    assert m.members["model.onnx"].sha256 == hashlib.sha256((digits_dir / "1" / "model.onnx").read_bytes()).hexdigest()
    assert m.config == (digits_dir / "config.toml").read_text()
    assert m.golden.count == 8 and info.signer == signing.key_id(signing.load_private_key(keys[0]).public_key())

    vb = open_bundle(signed, keys[1])
    assert vb.verified and vb.signer == info.signer and vb.config.name == "digits"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(digits_dir / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    (expected,) = sess.run(["logits"], {"input": golden_x[:8]})
    np.testing.assert_array_equal(vb.golden_inputs["input"], golden_x[:8])
    np.testing.assert_allclose(vb.golden_outputs["logits"], expected, rtol=1e-6, atol=1e-6)

    dest = vb.extract_to(install / "digits" / "1")
    assert sorted(p.name for p in dest.iterdir()) == sorted([*m.members, "manifest.json", "manifest.sig"])
    assert (dest / "model.onnx").read_bytes() == (digits_dir / "1" / "model.onnx").read_bytes()
    assert [p.name for p in (install / "digits").iterdir()] == ["1"]  # no staging directory left


def test_same_inputs_give_identical_bytes(digits_dir, golden_x, keys, tmp_path):
    a = _make(digits_dir, golden_x, tmp_path / "a.tegrad")
    b = _make(digits_dir, golden_x, tmp_path / "b.tegrad")
    assert a.read_bytes() == b.read_bytes()
    sign_bundle(a, keys[0])
    sign_bundle(b, keys[0])
    assert a.read_bytes() == b.read_bytes()  # Ed25519 is deterministic too
    with tarfile.open(a) as tf:
        assert tf.getnames()[:2] == ["manifest.json", "manifest.sig"]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tf.getmembers()} == {(0, 0, 0, 0o644)}


def test_gzipped_bundle_is_accepted(signed, keys, tmp_path):
    gz = tmp_path / "digits.tegrad.gz"
    gz.write_bytes(gzip.compress(signed.read_bytes(), mtime=0))
    assert open_bundle(gz, keys[1]).manifest.model == "digits"
    # The members fit under this limit, the tar stream with its headers and padding does not.
    with tarfile.open(signed) as tf:
        payload = sum(m.size for m in tf.getmembers()) + 1
    with pytest.raises(BundleError, match="decompresses to more than"):
        open_bundle(gz, keys[1], max_bytes=payload)


def test_calibrates_when_asked(digits_dir, tmp_path, golden_x, keys):
    config = (digits_dir / "config.toml").read_text().replace('precision = "fp32"',
                                                              'precision = "int8"\ncalibration_cache = "calib.json"')
    out = create(digits_dir / "1" / "model.onnx", tmp_path / "int8.tegrad", name="digits", config_text=config,
                 golden_inputs=golden_x, labels=digits_dir / "labels.txt", calibrate_data=golden_x,
                 calibrate_algorithm="max", created=CREATED)
    assert out.precision == "int8" and out.calibration_cache == "calib.json"
    sign_bundle(tmp_path / "int8.tegrad", keys[0])
    vb = open_bundle(tmp_path / "int8.tegrad", keys[1])
    dest = vb.extract_to(tmp_path / "x")
    cache = json.loads((dest / "calib.json").read_text())
    assert cache["algorithm"] == "max" and cache["num_samples"] == 16
    assert cache["model_sha256"] == out.members["model.onnx"].sha256


def test_create_refuses_bad_config_naming_the_key(digits_dir, golden_x, tmp_path):
    with pytest.raises(BundleError, match=r"config\.toml: max_batch: "):
        create(digits_dir, tmp_path / "x.tegrad", golden_inputs=golden_x, config_text="max_batch = -1\n")
    assert not (tmp_path / "x.tegrad").exists()


# ---- signatures ----------------------------------------------------------------------------------
def test_unknown_key_is_refused(digits_dir, golden_x, keys, tmp_path):
    path = _make(digits_dir, golden_x, tmp_path / "rogue.tegrad")
    kid = sign_bundle(path, keys[2])
    with pytest.raises(BundleError, match=f"signed by unknown key {kid}; trusted keys: [0-9a-f]{{16}} \\(fleet.pub\\)"):
        open_bundle(path, keys[1])
    with pytest.raises(BundleError, match="no trusted keys are configured"):
        open_bundle(path, None)


def test_tampered_manifest_is_refused(bundle_copy, keys, tmp_path):
    entries = []
    for info, data in _members(bundle_copy):
        if info.name == "manifest.json":
            data = data.replace(b'"version": 1', b'"version": 7')
        entries.append(_entry(info.name, data))
    path = _write_tar(tmp_path / "t.tegrad", entries)
    with pytest.raises(BundleError, match="signature does not match the manifest"):
        open_bundle(path, keys[1])


def test_tampered_member_is_refused_naming_it(bundle_copy, keys, install):
    _flip_byte(bundle_copy, "model.onnx")
    with pytest.raises(BundleError, match=r"member 'model\.onnx': sha256 .* does not match manifest\.json"):
        open_bundle(bundle_copy, keys[1]).extract_to(install / "d")
    with pytest.raises(BundleError, match="model.onnx"):  # hashes count even for unsigned development bundles
        open_bundle(bundle_copy, None, allow_unsigned=True)
    _assert_nothing_written(install)


def test_unsigned_needs_the_development_flag(digits_dir, golden_x, keys, tmp_path, caplog):
    path = _make(digits_dir, golden_x, tmp_path / "unsigned.tegrad")
    with pytest.raises(BundleError, match="is not signed; sign it with `tegrad bundle sign`"):
        open_bundle(path, keys[1])
    with caplog.at_level(logging.WARNING, logger="tegrad.rollout"):
        vb = open_bundle(path, keys[1], allow_unsigned=True)
    assert not vb.verified and vb.signer is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "UNVERIFIED BUNDLE" in warnings[0].getMessage()
    assert "--allow-unsigned" in warnings[0].getMessage()


def test_signature_file_must_be_well_formed(bundle_copy, keys, tmp_path):
    entries = [_entry(i.name, b"not json" if i.name == "manifest.sig" else d) for i, d in _members(bundle_copy)]
    with pytest.raises(BundleError, match="manifest.sig is not a tegrad signature file"):
        open_bundle(_write_tar(tmp_path / "s.tegrad", entries), keys[1])


def test_trust_store_refuses_a_broken_key_file(tmp_path):
    (tmp_path / "bad.pub").write_text("hello")
    with pytest.raises(BundleError, match="bad.pub is not a PEM public key"):
        signing.TrustStore(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        signing.TrustStore(tmp_path / "missing")


def test_keygen_never_overwrites_and_keeps_the_key_private(tmp_path):
    key, pub, kid = signing.generate_keypair(tmp_path, "k")
    assert key.stat().st_mode & 0o777 == 0o600 and pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert kid == hashlib.sha256(signing.load_public_key(pub).public_bytes_raw()).hexdigest()[:16]
    with pytest.raises(BundleError, match="already exists"):
        signing.generate_keypair(tmp_path, "k")


# ---- hostile tars --------------------------------------------------------------------------------
HOSTILE = {
    "absolute": (lambda tmp: _entry(str(tmp / "abs-evil"), b"x"), "has an absolute path"),
    "dotdot": (lambda tmp: _entry("../evil", b"x"), r"points outside the bundle \('\.\.'\)"),
    "subdir": (lambda tmp: _entry("sub/evil", b"x"), "has a directory part"),
    "symlink": (lambda tmp: _entry("evil", type_=tarfile.SYMTYPE, linkname="/etc/passwd"), "is a symbolic link"),
    "hardlink": (lambda tmp: _entry("evil", type_=tarfile.LNKTYPE, linkname="model.onnx"), "is a hard link"),
    "chardev": (lambda tmp: _entry("evil", type_=tarfile.CHRTYPE), "is a character device"),
    "fifo": (lambda tmp: _entry("evil", type_=tarfile.FIFOTYPE), "is a FIFO"),
    "directory": (lambda tmp: _entry("evil", type_=tarfile.DIRTYPE), "is a directory"),
    "duplicate": (lambda tmp: _entry("model.onnx", b"x"), "appears twice"),
    "unlisted": (lambda tmp: _entry("extra.bin", b"x"), "'extra.bin' is not listed in manifest.json"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused_before_anything_is_written(case, bundle_copy, keys, tmp_path, install):
    make, message = HOSTILE[case]
    entries = [_entry(i.name, d) for i, d in _members(bundle_copy)] + [make(tmp_path)]
    path = _write_tar(tmp_path / "evil.tegrad", entries)
    dest = install / "digits"
    with pytest.raises(BundleError, match=message):
        open_bundle(path, keys[1]).extract_to(dest)
    assert not dest.exists()
    _assert_nothing_written(install)
    assert not (tmp_path / "abs-evil").exists() and not (tmp_path / "evil").exists()


def test_missing_member_is_refused(bundle_copy, keys, tmp_path):
    entries = [_entry(i.name, d) for i, d in _members(bundle_copy) if i.name != "labels.txt"]
    with pytest.raises(BundleError, match="lists 'labels.txt' but the bundle does not contain it"):
        open_bundle(_write_tar(tmp_path / "m.tegrad", entries), keys[1])


def test_limits(signed, keys):
    with pytest.raises(BundleError, match="over the limit of 50000"):
        open_bundle(signed, keys[1], max_bytes=50_000)
    with pytest.raises(BundleError, match="more than 3 members"):
        open_bundle(signed, keys[1], max_members=3)


def test_not_a_tar(tmp_path, keys):
    (tmp_path / "junk.tegrad").write_bytes(b"\x00junk" * 300)
    with pytest.raises(BundleError, match="is not a tar bundle"):
        open_bundle(tmp_path / "junk.tegrad", keys[1])


def test_declared_sizes_over_the_limit(tmp_path, keys):
    # A header may claim more data than the file holds; the sum of claims counts too.
    info = tarfile.TarInfo("manifest.json")
    info.size = 10 << 20
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    (tmp_path / "big.tegrad").write_bytes(header + b"\0" * 1024)
    with pytest.raises(BundleError, match="more than the limit of 1048576 bytes"):
        open_bundle(tmp_path / "big.tegrad", keys[1], max_bytes=1 << 20)


def test_newer_tegrad_required_is_refused(digits_dir, golden_x, keys, tmp_path):
    path = _make(digits_dir, golden_x, tmp_path / "new.tegrad", min_tegrad_version="99.1")
    sign_bundle(path, keys[0])
    with pytest.raises(BundleError, match=r"needs tegrad >= 99\.1, this is 0\.1\.0; upgrade tegrad"):
        open_bundle(path, keys[1])


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(extra=1), "manifest.json: extra: unknown key"),
    (lambda d: d.pop("validation"), "manifest.json: validation: Field required"),
    (lambda d: d["validation"].pop("min_f1"), "manifest.json: validation.min_f1: Field required"),
    (lambda d: d.update(version="1"), "manifest.json: version: Input should be a valid integer"),
    (lambda d: d.update(model="../etc"), "manifest.json: model: String should match pattern"),
    (lambda d: d.update(format_version=2), "format_version 2 was written by a newer tegrad"),
])
def test_manifest_is_strict(signed, change, message):
    doc = json.loads(read_manifest(signed).manifest.to_bytes())
    change(doc)
    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(doc).encode())


def test_config_must_match_the_manifest(bundle_copy, keys, tmp_path):
    config = read_manifest(bundle_copy).manifest.config.replace('precision = "fp32"', 'precision = "fp16"')
    path = _forge(bundle_copy, tmp_path / "c.tegrad", keys[0], replace={"config.toml": config.encode()},
                  update={"config": config})
    with pytest.raises(BundleError, match="precision 'fp16' differs from the manifest's 'fp32'"):
        open_bundle(path, keys[1])


# ---- ONNX external data --------------------------------------------------------------------------
@pytest.fixture()
def external_dir(tmp_path) -> Path:
    d = tmp_path / "scaler"
    (d / "1").mkdir(parents=True)
    w = numpy_helper.from_array(np.arange(1, 65, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "scaler",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(d / "1" / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    (d / "config.toml").write_text('max_batch = 8\n[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [64]\n'
                                   '[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [64]\n')
    return d


def test_external_data_inside_the_bundle_is_accepted(external_dir, keys, tmp_path):
    x = np.ones((3, 64), np.float32)
    m = create(external_dir, tmp_path / "s.tegrad", golden_inputs={"x": x}, validation={"task": "regression"},
               created=CREATED)
    assert "weights.bin" in m.members
    sign_bundle(tmp_path / "s.tegrad", keys[0])
    vb = open_bundle(tmp_path / "s.tegrad", keys[1])
    np.testing.assert_array_equal(vb.golden_outputs["y"], x * np.arange(1, 65, dtype=np.float32))
    dest = vb.extract_to(tmp_path / "out")
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], vb.golden_outputs["y"])


def test_external_data_outside_the_bundle_is_refused(external_dir, keys, tmp_path, install):
    create(external_dir, tmp_path / "s.tegrad", golden_inputs={"x": np.ones((2, 64), np.float32)},
           validation={"task": "regression"}, created=CREATED)
    proto = onnx.load(str(external_dir / "1" / "model.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.bin"
    path = _forge(tmp_path / "s.tegrad", tmp_path / "evil.tegrad", keys[0],
                  replace={"model.onnx": proto.SerializeToString()})
    with pytest.raises(BundleError, match=r"tensor 'w' keeps its data in '\.\./outside\.bin', which is not a plain"):
        open_bundle(path, keys[1]).extract_to(install / "s")
    _assert_nothing_written(install)


# ---- atomic extraction ---------------------------------------------------------------------------
def test_extract_refuses_an_existing_destination(signed, keys, install):
    (install / "digits").mkdir()
    (install / "digits" / "keep").write_text("old")
    with pytest.raises(BundleError, match="already exists"):
        open_bundle(signed, keys[1]).extract_to(install / "digits")
    assert [p.name for p in install.iterdir()] == ["digits"]
    assert [p.name for p in (install / "digits").iterdir()] == ["keep"]


def test_bundle_changed_after_verification_leaves_no_destination(bundle_copy, keys, install):
    vb = open_bundle(bundle_copy, keys[1])
    _flip_byte(bundle_copy, "golden.npz", at=5)
    with pytest.raises(BundleError, match=r"member 'golden\.npz': sha256"):
        vb.extract_to(install / "digits")
    _assert_nothing_written(install)


# ---- command line --------------------------------------------------------------------------------
def test_cli_end_to_end(digits_dir, golden_x, tmp_path, capsys):
    np.savez(tmp_path / "golden.npz", input=golden_x)
    out = tmp_path / "d.tegrad"
    assert cli.main(["bundle", "keygen", "--out", str(tmp_path / "keys"), "--name", "ci"]) == 0
    kid = capsys.readouterr().out.split("key id ")[1].strip()
    (tmp_path / "trust").mkdir()
    shutil.copy(tmp_path / "keys" / "ci.pub", tmp_path / "trust" / "ci.pub")

    assert cli.main(["bundle", "create", str(digits_dir), "-o", str(out), "--calibration-cache",
                     str(digits_dir / "calib.json"), "--golden-inputs", str(tmp_path / "golden.npz"),
                     "--golden-count", "4", "--min-top1-agreement", "0.98", "--created", CREATED]) == 0
    assert "digits v1 (fp32), 5 members, 4 golden samples" in capsys.readouterr().out

    assert cli.main(["bundle", "verify", str(out), "--trust", str(tmp_path / "trust")]) == 2
    assert "is not signed" in capsys.readouterr().err

    assert cli.main(["bundle", "sign", str(out), "--key", str(tmp_path / "keys" / "ci.key")]) == 0
    assert kid in capsys.readouterr().out

    assert cli.main(["bundle", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("digits version 1", "precision   fp32", f"key {kid}", "golden      4 samples",
                     "min_top1_agreement 0.98", "model.onnx", "sha256 4f3792eb95d8b68d"):
        assert expected in text

    assert cli.main(["bundle", "verify", str(out), "--trust", str(tmp_path / "trust"),
                     "--extract-to", str(tmp_path / "installed")]) == 0
    assert f"signed by trusted key {kid}" in capsys.readouterr().out
    assert (tmp_path / "installed" / "model.onnx").is_file()

    assert cli.main(["bundle", "verify", str(out)]) == 2
    assert "give --trust DIR" in capsys.readouterr().err
