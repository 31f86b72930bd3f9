"""The Jetson collector against recorded sysfs/procfs trees of an Orin Nano (JetPack 6.2),
an AGX Orin (JetPack 6.1, jetson_clocks on) and an AGX Orin on JetPack 5.1.2 (MODE_15W,
half the cores off, JetPack 5 zone names and EMC activity file)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.telemetry import metrics as m
from daemon.telemetry.collector import DeviceTelemetry, start_device_telemetry
from daemon.telemetry.jetson import (
    ClockState,
    JetsonTelemetry,
    board_info,
    clock_state,
    jetpack_for,
    not_jetson_reason,
)
from tests.waiting import wait_until

FIXTURES = Path(__file__).parent / "fixtures"
BOARDS = ("orin-nano-jp6", "agx-orin-jp6", "agx-orin-jp5")
JETSON = {x for x in m.DEVICE_METRICS if x.name.startswith("tegrad_jetson_")}
UNITS = ("_ratio", "_hertz", "_bytes", "_celsius", "_volts", "_amperes", "_watts", "_rpm", "_info", "_mode",
         "_enabled", "_online", "_state", "_events")


def readings(root: Path) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(metric.name, labels): value for metric, labels, value in JetsonTelemetry(root).read()}


# Values worked out by hand from the raw files: m°C, mV, mA, kHz (CPU), Hz (GPU, EMC), kB, 0-1000, 0-255.
EXPECTED = {
    "orin-nano-jp6": {
        ("tegrad_jetson_info", ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
                                "p3768-0000+p3767-0005-super", "tegra234", "36.4.3", "6.2", "12.6.68", "10.3.0.30")): 1,
        ("tegrad_jetson_gpu_load_ratio", ("gpu",)): 0.617,
        ("tegrad_jetson_gpu_frequency_hertz", ("gpu",)): 1.02e9,
        ("tegrad_jetson_gpu_frequency_min_hertz", ("gpu",)): 3.06e8,
        ("tegrad_jetson_gpu_frequency_max_hertz", ("gpu",)): 1.02e9,
        ("tegrad_jetson_emc_frequency_hertz", ()): 3.199e9,
        ("tegrad_jetson_emc_frequency_max_hertz", ()): 3.199e9,
        ("tegrad_jetson_emc_load_ratio", ()): 0.30,
        ("tegrad_jetson_cpu_online", ("5",)): 1,
        ("tegrad_jetson_cpu_frequency_hertz", ("1",)): 1.5104e9,
        ("tegrad_jetson_cpu_frequency_min_hertz", ("1",)): 7.296e8,
        ("tegrad_jetson_cpu_frequency_max_hertz", ("1",)): 1.728e9,
        ("tegrad_jetson_memory_total_bytes", ()): 7802584 * 1024,
        ("tegrad_jetson_memory_used_bytes", ()): (7802584 - 1236408 - 98340 - 3211672) * 1024,
        ("tegrad_jetson_memory_available_bytes", ()): 4519060 * 1024,
        ("tegrad_jetson_swap_total_bytes", ()): 3901268 * 1024,
        ("tegrad_jetson_swap_used_bytes", ()): (3901268 - 3779636) * 1024,
        ("tegrad_jetson_nvmap_used_bytes", ()): 1599560 * 1024,
        ("tegrad_jetson_temperature_celsius", ("cpu-thermal",)): 56.531,
        ("tegrad_jetson_temperature_celsius", ("gpu-thermal",)): 58.218,
        ("tegrad_jetson_thermal_trip_celsius", ("cpu-thermal", "0", "passive")): 99.0,
        ("tegrad_jetson_thermal_trip_celsius", ("gpu-thermal", "1", "critical")): 103.0,
        ("tegrad_jetson_cooling_state", ("cooling_device0", "pwm-fan")): 4,
        ("tegrad_jetson_cooling_max_state", ("cooling_device0", "pwm-fan")): 10,
        ("tegrad_jetson_overcurrent_events", ("oc2",)): 2,
        ("tegrad_jetson_rail_voltage_volts", ("VDD_IN",)): 5.056,
        ("tegrad_jetson_rail_current_amperes", ("VDD_IN",)): 1.728,
        ("tegrad_jetson_rail_power_watts", ("VDD_IN",)): 5.056 * 1.728,
        ("tegrad_jetson_rail_power_watts", ("VDD_CPU_GPU_CV",)): 5.048 * 0.644,
        ("tegrad_jetson_rail_power_watts", ("VDD_SOC",)): 5.048 * 0.321,
        ("tegrad_jetson_power_watts", ()): 5.056 * 1.728,  # VDD_IN is the module's input: not the sum
        ("tegrad_jetson_fan_pwm_ratio", ("1",)): 153 / 255,
        ("tegrad_jetson_fan_rpm", ("1",)): 3126,
        ("tegrad_jetson_nvpmodel_mode", ("2", "MAXN_SUPER")): 1,
        ("tegrad_jetson_clocks_enabled", ()): 0,
    },
    "agx-orin-jp6": {
        ("tegrad_jetson_info", ("Jetson AGX Orin Developer Kit", "p3737-0000+p3701-0005", "tegra234", "36.4.0",
                                "6.1", "12.6.68", "10.3.0.30")): 1,
        ("tegrad_jetson_gpu_load_ratio", ("gpu",)): 0.993,
        ("tegrad_jetson_gpu_frequency_hertz", ("gpu",)): 1.3005e9,
        ("tegrad_jetson_emc_load_ratio", ()): 0.70,
        ("tegrad_jetson_cpu_frequency_hertz", ("11",)): 2.2016e9,
        ("tegrad_jetson_memory_total_bytes", ()): 64335836 * 1024,
        ("tegrad_jetson_swap_used_bytes", ()): 0,
        ("tegrad_jetson_temperature_celsius", ("cv1-thermal",)): 57.812,
        ("tegrad_jetson_temperature_celsius", ("tj-thermal",)): 66.593,
        ("tegrad_jetson_rail_power_watts", ("VDD_GPU_SOC",)): 4.984 * 4.592,
        ("tegrad_jetson_rail_power_watts", ("VDDQ_VDD2_1V8AO",)): 4.992 * 0.320,
        # No VDD_IN on AGX Orin: the measured rails together.
        ("tegrad_jetson_power_watts", ()): 4.984 * 4.592 + 4.984 * 1.988 + 4.968 * 1.176 + 4.992 * 0.320,
        ("tegrad_jetson_fan_pwm_ratio", ("1",)): 1.0,
        ("tegrad_jetson_fan_rpm", ("1",)): 5168,
        ("tegrad_jetson_nvpmodel_mode", ("0", "MAXN")): 1,
        ("tegrad_jetson_clocks_enabled", ()): 1,
    },
    "agx-orin-jp5": {
        ("tegrad_jetson_info", ("Jetson AGX Orin", "p3737-0000+p3701-0004", "tegra234", "35.4.1", "5.1.2",
                                "11.4.315", "8.5.2")): 1,
        ("tegrad_jetson_gpu_load_ratio", ("ga10b",)): 0.0,
        ("tegrad_jetson_gpu_frequency_hertz", ("ga10b",)): 3.06e8,
        ("tegrad_jetson_gpu_frequency_max_hertz", ("ga10b",)): 6.12e8,
        ("tegrad_jetson_emc_frequency_hertz", ()): 2.133e9,
        ("tegrad_jetson_emc_frequency_max_hertz", ()): 2.133e9,  # max_rate 3.199 GHz under the nvpmodel cap
        ("tegrad_jetson_emc_load_ratio", ()): 0.04,
        ("tegrad_jetson_cpu_online", ("3",)): 1,
        ("tegrad_jetson_cpu_online", ("4",)): 0,
        ("tegrad_jetson_cpu_online", ("7",)): 0,
        ("tegrad_jetson_cpu_frequency_hertz", ("0",)): 1.1136e9,
        ("tegrad_jetson_nvmap_used_bytes", ()): 365808 * 1024,
        ("tegrad_jetson_temperature_celsius", ("CPU-therm",)): 41.437,
        ("tegrad_jetson_temperature_celsius", ("Tj-therm",)): 41.656,
        ("tegrad_jetson_temperature_celsius", ("Tboard_tegra",)): 32.0,
        ("tegrad_jetson_power_watts", ()): 4.992 * 0.479 + 4.992 * 0.159 + 4.976 * 0.708 + 4.984 * 0.060,
        ("tegrad_jetson_fan_pwm_ratio", ("1",)): 0.0,
        ("tegrad_jetson_fan_rpm", ("1",)): 0,
        ("tegrad_jetson_nvpmodel_mode", ("1", "MODE_15W")): 1,
        ("tegrad_jetson_clocks_enabled", ()): 0,
    },
}


@pytest.mark.parametrize("board", BOARDS)
def test_values_and_units(board):
    got = readings(FIXTURES / board)
    for key, value in EXPECTED[board].items():
        assert key in got, f"{key} missing from {board}"
        assert got[key] == pytest.approx(value, rel=1e-9), key
    for name, _ in got:
        assert name.endswith(UNITS), f"{name} has no base-unit suffix"


def test_every_jetson_metric_comes_from_some_board():
    seen = {name for board in BOARDS for name, _ in readings(FIXTURES / board)}
    assert seen == {x.name for x in JETSON}


@pytest.mark.parametrize("board", BOARDS)
def test_labels_are_bounded_and_complete(board):
    got = readings(FIXTURES / board)
    by_metric = {x.name: x for x in JETSON}
    for name, labels in got:
        assert len(labels) == len(by_metric[name].labels)
    # Powered-off engines (-256 °C), an empty tj reading and NC rails are absent, not zero.
    zones = {labels[0] for name, labels in got if name == "tegrad_jetson_temperature_celsius"}
    rails = {labels[0] for name, labels in got if name == "tegrad_jetson_rail_power_watts"}
    assert "NC" not in rails
    if board == "orin-nano-jp6":
        assert zones == {"cpu-thermal", "gpu-thermal", "soc0-thermal", "soc1-thermal", "soc2-thermal"}
        assert rails == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    if board == "agx-orin-jp5":
        cpus = {labels[0] for name, labels in got if name == "tegrad_jetson_cpu_frequency_hertz"}
        assert cpus == {"0", "1", "2", "3"}  # offline cores have no clock


def _break(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "unreadable":
        # A directory where the file was: open() fails with an OSError, as an EAGAIN or EACCES read does
        # (the tests run as root, so permission bits would not stop the read).
        path.unlink()
        path.mkdir()
    else:
        path.write_text("EAGAIN\n")


BREAKS = [
    ("orin-nano-jp6", "sys/class/devfreq/17000000.gpu/device/load", [("tegrad_jetson_gpu_load_ratio", ("gpu",))]),
    ("orin-nano-jp6", "sys/devices/virtual/thermal/thermal_zone1/temp",
     [("tegrad_jetson_temperature_celsius", ("gpu-thermal",))]),
    ("orin-nano-jp6", "sys/class/hwmon/hwmon1/curr2_input",
     [("tegrad_jetson_rail_current_amperes", ("VDD_CPU_GPU_CV",)), ("tegrad_jetson_rail_power_watts", ("VDD_CPU_GPU_CV",))]),
    ("orin-nano-jp6", "sys/class/hwmon/hwmon2/rpm", [("tegrad_jetson_fan_rpm", ("1",))]),
    ("orin-nano-jp6", "sys/kernel/debug/cactmon/mc_all", [("tegrad_jetson_emc_load_ratio", ())]),
    ("orin-nano-jp6", "var/lib/nvpmodel/status", [("tegrad_jetson_nvpmodel_mode", ("2", "MAXN_SUPER"))]),
    ("orin-nano-jp6", "sys/devices/system/cpu/cpu3/cpufreq/scaling_cur_freq",
     [("tegrad_jetson_cpu_frequency_hertz", ("3",))]),
    ("agx-orin-jp6", "sys/class/hwmon/hwmon3/in2_input",  # VDDQ_VDD2_1V8AO: the AGX total needs every rail
     [("tegrad_jetson_rail_voltage_volts", ("VDDQ_VDD2_1V8AO",)), ("tegrad_jetson_rail_power_watts", ("VDDQ_VDD2_1V8AO",)),
      ("tegrad_jetson_power_watts", ())]),
    ("agx-orin-jp6", "sys/devices/virtual/thermal/cooling_device0/cur_state",
     [("tegrad_jetson_cooling_state", ("cooling_device0", "pwm-fan"))]),
    ("agx-orin-jp5", "sys/kernel/actmon_avg_activity/mc_all", [("tegrad_jetson_emc_load_ratio", ())]),
    ("agx-orin-jp5", "sys/devices/system/cpu/cpu2/cpufreq/scaling_max_freq",
     [("tegrad_jetson_cpu_frequency_max_hertz", ("2",))]),
]


@pytest.mark.parametrize("how", ["missing", "unreadable", "garbage"])
@pytest.mark.parametrize(("board", "rel", "lost"), BREAKS, ids=[f"{b}:{Path(r).name}" for b, r, _ in BREAKS])
def test_a_bad_file_drops_only_its_metrics(tmp_path, board, rel, lost, how):
    root = tmp_path / board
    shutil.copytree(FIXTURES / board, root)
    before = readings(root)
    assert set(lost) <= set(before)
    _break(root / rel, how)
    after = readings(root)
    assert set(before) - set(after) == set(lost)
    for key in after:
        assert after[key] == before[key], key


def test_a_missing_file_found_at_start_drops_at_run_time(tmp_path):
    root = tmp_path / "nano"
    shutil.copytree(FIXTURES / "orin-nano-jp6", root)
    telemetry = JetsonTelemetry(root)
    (root / "sys/class/hwmon/hwmon1/in1_input").unlink()
    got = {(x.name, labels) for x, labels, _ in telemetry.read()}
    assert ("tegrad_jetson_rail_power_watts", ("VDD_IN",)) not in got
    assert ("tegrad_jetson_power_watts", ()) not in got  # never the sub-rails' sum on a module with VDD_IN
    assert ("tegrad_jetson_rail_power_watts", ("VDD_SOC",)) in got


def test_clock_state():
    assert clock_state(FIXTURES / "orin-nano-jp6") == ClockState(2, "MAXN_SUPER", False)
    assert clock_state(FIXTURES / "agx-orin-jp6") == ClockState(0, "MAXN", True)
    assert clock_state(FIXTURES / "agx-orin-jp5") == ClockState(1, "MODE_15W", False)


def test_clock_state_without_nvpmodel(tmp_path):
    root = tmp_path / "agx"
    shutil.copytree(FIXTURES / "agx-orin-jp6", root)
    (root / "var/lib/nvpmodel/status").unlink()
    assert clock_state(root) == ClockState(None, "", True)
    assert clock_state(tmp_path / "empty") == ClockState(None, "", None)


def test_board_info_from_a_full_size_dpkg_status(tmp_path):
    root = tmp_path / "nano"
    shutil.copytree(FIXTURES / "orin-nano-jp6", root)
    status = root / "var/lib/dpkg/status"
    # A JetPack image lists ~2000 packages (megabytes); TensorRT's entry comes late.
    filler = "".join(f"Package: pkg{i}\nStatus: install ok installed\nVersion: 1.{i}\n\n" for i in range(40000))
    status.write_text(filler + status.read_text())
    assert status.stat().st_size > 1 << 20
    assert board_info(root).tensorrt == "10.3.0.30"


def test_jetpack_from_l4t():
    assert jetpack_for("35.4.1") == "5.1.2"
    assert jetpack_for("35.5.0") == "5.1.3"
    assert jetpack_for("36.4.7") == "6.2.1"
    assert jetpack_for("36.3.0") == "6.0"
    assert jetpack_for("34.1.1") == ""


def test_not_a_jetson(tmp_path, caplog):
    assert "absent" in not_jetson_reason(tmp_path)
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/compatible").write_bytes(b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    assert "no NVIDIA Tegra SoC" in not_jetson_reason(tmp_path)
    for board in BOARDS:
        assert not_jetson_reason(FIXTURES / board) is None
    with caplog.at_level(logging.INFO, logger="tegrad.telemetry"):
        telemetry = start_device_telemetry(1.0, tmp_path)
    try:
        jetson_lines = [r for r in caplog.records if "tegrad_jetson_" in r.getMessage()]
        assert len(jetson_lines) == 1 and jetson_lines[0].levelno == logging.INFO
        assert "no NVIDIA Tegra SoC" in jetson_lines[0].getMessage()
        names = {x.name for source in (telemetry.sources if telemetry else []) for x, _, _ in source.read()}
        assert not any(n.startswith("tegrad_jetson_") for n in names)
    finally:
        if telemetry is not None:
            telemetry.stop()


def test_period_zero_is_off(caplog):
    with caplog.at_level(logging.INFO, logger="tegrad.telemetry"):
        assert start_device_telemetry(0, FIXTURES / "orin-nano-jp6") is None
    assert "off" in caplog.text


def test_thread_publishes_fresh_snapshots_rendered_by_prometheus_client(tmp_path):
    root = tmp_path / "nano"
    shutil.copytree(FIXTURES / "orin-nano-jp6", root)
    snapshot = m.DeviceSnapshot()
    registry = CollectorRegistry()
    registry.register(snapshot)
    telemetry = DeviceTelemetry([JetsonTelemetry(root)], period=0.02, snapshot=snapshot).start()
    try:
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
        assert families["tegrad_jetson_gpu_load_ratio"].samples[0].value == 0.617
        assert families["tegrad_jetson_overcurrent_events"].type == "counter"
        assert families["tegrad_jetson_temperature_celsius"].type == "gauge"
        (root / "sys/class/devfreq/17000000.gpu/device/load").write_text("250\n")

        def load():
            text = generate_latest(registry).decode()
            return 'tegrad_jetson_gpu_load_ratio{gpu="gpu"} 0.25' in text

        wait_until(load, 30.0)
    finally:
        telemetry.stop()
    assert generate_latest(registry) == b""  # stopped: no stale device series


def test_a_failing_source_spares_the_others(caplog):
    class Broken:
        def read(self):
            raise RuntimeError("sensor driver bug")

    snapshot = m.DeviceSnapshot()
    telemetry = DeviceTelemetry([Broken(), JetsonTelemetry(FIXTURES / "agx-orin-jp6")], period=3600, snapshot=snapshot)
    with caplog.at_level(logging.ERROR, logger="tegrad.telemetry"):
        telemetry.collect()
        telemetry.collect()
    assert caplog.text.count("Broken failed") == 1  # logged once, not every period
    assert any(f.name == "tegrad_jetson_power_watts" for f in snapshot.collect())


def test_clock_records_and_warnings_for_builds_and_selftest():
    from daemon.selftest import clock_lines
    from daemon.telemetry.jetson import clock_record, clock_warning

    assert clock_record(FIXTURES / "agx-orin-jp6") == {"nvpmodel_mode": 0, "nvpmodel_name": "MAXN", "jetson_clocks": True}
    assert clock_warning(clock_state(FIXTURES / "agx-orin-jp6")) is None
    warning = clock_warning(clock_state(FIXTURES / "orin-nano-jp6"))
    assert "jetson_clocks is off" in warning and "MAXN_SUPER" in warning
    assert clock_lines(FIXTURES / "agx-orin-jp6") == ["clocks: nvpmodel mode 0 (MAXN), jetson_clocks on"]
    lines = clock_lines(FIXTURES / "agx-orin-jp5")
    assert lines[0] == "clocks: nvpmodel mode 1 (MODE_15W), jetson_clocks off" and lines[1].startswith("WARNING: ")
    assert clock_record(FIXTURES / "no-such-board") is None and clock_lines(FIXTURES / "no-such-board") == []
