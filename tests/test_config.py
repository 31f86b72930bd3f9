from pathlib import Path

import pytest

from daemon.config import VersionPolicy, load_model_config, parse_model_config
from daemon.errors import ConfigError

PATH = Path("repo/m/config.toml")


def test_defaults_and_name_from_directory():
    cfg = parse_model_config("", PATH, "m")
    assert cfg.name == "m" and cfg.max_batch == 0 and cfg.instances == 1 and cfg.precision == "fp32"
    assert cfg.version_policy.select([3, 1, 2]) == [3]


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("max_batch = -1", "max_batch", "greater than or equal to 0"),
        ("instanses = 2", "instanses", "unknown key"),
        ('[[input]]\nname = "x"\ndatatype = "FP33"\ndims = [1]', "input.0.datatype", "unknown datatype 'FP33'"),
        ('[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [0]', "input.0.dims", "positive"),
        ('precision = "int4"', "precision", "fp32"),
        ("[version_policy]\nlatest = 2\nall = true", "version_policy", "only one"),
        ("max_batch = 4\n[dynamic_batching]\npreferred_batch_sizes = [8]", "(top level)", "exceed max_batch"),
        ('[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [2]\n[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [2]', "(top level)", "duplicate output names: y"),
        ("max_batch = [", "", "not valid TOML"),
        ('name = "other"', "name", "does not match the directory name"),
        ('precision = "int8"', "(top level)", "needs calibration_cache"),
        ('precision = "mixed"\ncalibration_cache = "c.json"', "(top level)", "needs exclude"),
        ('exclude = ["conv1"]', "(top level)", "exclude applies to precision 'mixed'"),
        ("[tensorrt]\nworkspace_mb = 1", "tensorrt.workspace_mb", "greater than or equal to 16"),
        ('[[tensorrt.profile]]\ninput = "x"\nmin = [1, 3]\nopt = [4, 2]\nmax = [8, 3]', "tensorrt.profile.0", "min <= opt <= max"),
        ("[build]\ntimeout_s = 0", "build.timeout_s", "greater than 0"),
    ],
)
def test_errors_name_file_key_and_problem(text, key, words):
    with pytest.raises(ConfigError) as err:
        parse_model_config(text, PATH, "m")
    message = str(err.value)
    assert message.startswith(str(PATH)) and key in message and words in message


def test_version_policies():
    assert VersionPolicy(latest=2).select([1, 5, 3]) == [3, 5]
    assert VersionPolicy(all=True).select([2, 1]) == [1, 2]
    assert VersionPolicy(specific=[1, 4]).select([1, 2, 3]) == [1]


def test_embedded_digits_config_is_valid():
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "daemon" / "models" / "digits")
    assert cfg.max_batch == 64 and cfg.output[0].labels == "labels.txt"


@pytest.mark.parametrize(
    "content, words",
    [
        (b'max_batch = 1\nname = "\xff\xfe"\n', "not valid UTF-8 (byte 22, line 2)"),
        (b"a = " + b"[" * 100_000, "nested too deeply"),
        (b"a = " + b"{b = " * 100_000, "nested too deeply"),
        (b"[" * 100_000, "not valid TOML"),
        (b"max_batch = 1\x00\n", "not valid TOML"),
        (b"#" * (2 << 20), "more than 1048576 bytes"),
        (b"\n".join(b"k%d = 1" % i for i in range(500)), "and 490 more problems"),
    ],
    ids=["invalid-utf8", "nested-arrays", "nested-tables", "nested-headers", "nul", "huge", "many-errors"],
)
def test_hostile_config_files_are_refused_with_the_file_named(tmp_path, content, words):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.toml").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_model_config(tmp_path / "m", shown_as="m/config.toml")
    message = str(err.value)
    assert message.startswith("m/config.toml: ") and words in message, message
    assert str(tmp_path) not in message
    assert len(message) < 2000


def test_missing_config_file_means_defaults(tmp_path):
    assert load_model_config(tmp_path, "m").max_batch == 0


def test_config_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "config.toml")  # reading a FIFO would block the load forever
    with pytest.raises(ConfigError, match="m/config.toml: not a regular file"):
        load_model_config(tmp_path, "m", shown_as="m/config.toml")
