"""Jetson hardware telemetry read straight from sysfs/procfs (and debugfs where readable).

No jtop service and no root for the basic set (GPU, CPU, memory, thermal, power
rails, fan, nvpmodel); EMC clock and activity live in debugfs and appear only
when tegrad runs as root. Paths and formats are those of
``shared/reference/jetson-telemetry.md`` (JetPack 5 r35, JetPack 6 r36, Thor r38+).

Everything is relative to a root directory, so a container that mounts the
host's /sys and /proc elsewhere, and the tests with their recorded fixture
trees, read the same code path. Directories (GPU devfreq node, hwmon chips,
thermal zones) are found once at start; values are read every period.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from daemon.telemetry import metrics as m
from daemon.telemetry.metrics import Reading
from daemon.telemetry.sysfs import numbered, read_file, read_int, read_lines, read_text

# devfreq of_node names of the integrated GPUs (Xavier gv11b, Orin ga10b / gpu, TX2 gp10b, Thor gb10b).
GPU_NODES = frozenset({"ga10b", "gv11b", "gp10b", "gb10b", "gpu"})
# L4T release -> JetPack, as jetson_stats maps them; a release absent here reports jetpack="".
JETPACK = {
    "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5": "5.1.3", "35.6.0": "5.1.4",
    "35.6.1": "5.1.5", "35.6.2": "5.1.5", "35.6.3": "5.1.5", "35.6.4": "5.1.6",
    "36.3": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1", "36.5": "6.2.2",
    "38.2": "7.0", "38.4": "7.1", "39.2": "7.2",
}
# Thermal zones of gated engines (GPU, CV) read -256 °C while powered off.
_UNPOWERED_C = -256.0
_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)")
_PMODE = re.compile(r"pmode:\s*(\d+)")


@dataclass(frozen=True)
class BoardInfo:
    board: str = ""  # the device-tree model, e.g. "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    module: str = ""
    soc: str = ""
    l4t: str = ""
    jetpack: str = ""
    cuda: str = ""
    tensorrt: str = ""


@dataclass(frozen=True)
class ClockState:
    """What decides how fast the same engine runs today: the power mode and jetson_clocks."""

    mode_id: int | None = None      # nvpmodel mode; None where /var/lib/nvpmodel/status is absent
    mode_name: str = ""             # from /etc/nvpmodel.conf; "" where the id is not listed there
    jetson_clocks: bool | None = None  # None where no clock limits are readable


def not_jetson_reason(root: Path | str = "/") -> str | None:
    """None on a Jetson; otherwise the sentence that says why this machine is not taken for one."""
    compatible = read_text(Path(root) / "proc/device-tree/compatible")
    if compatible is None:
        return "/proc/device-tree/compatible is absent (no device tree: not a Jetson)"
    socs = [c for c in compatible.split("\0") if c.startswith("nvidia,tegra")]
    if not socs:
        return f"/proc/device-tree/compatible names no NVIDIA Tegra SoC ({compatible.replace(chr(0), ', ')})"
    return None


def l4t_release(root: Path) -> str:
    line = read_text(root / "etc/nv_tegra_release") or ""
    match = _RELEASE.search(line)
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def jetpack_for(l4t: str) -> str:
    if l4t in JETPACK:
        return JETPACK[l4t]
    # Point releases not listed ("35.5.0") map through their major.minor ("35.5").
    return JETPACK.get(".".join(l4t.split(".")[:2]), "")


def _dpkg_versions(root: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """Versions of installed Debian packages from dpkg's status file (no subprocess, no root)."""
    found: dict[str, str] = {}
    name = ""
    for line in (read_file(root / "var/lib/dpkg/status") or "").splitlines():
        if line.startswith("Package: "):
            name = line[9:].strip()
        elif line.startswith("Version: ") and name in packages:
            found[name] = line[9:].strip().split("-")[0].split("+")[0]
    return found


def _cuda_version(root: Path) -> str:
    text = read_text(root / "usr/local/cuda/version.json")
    if text:
        try:
            return str(json.loads(text)["cuda"]["version"])
        except (ValueError, KeyError, TypeError):
            pass
    text = read_text(root / "usr/local/cuda/version.txt") or ""  # CUDA 10.x: "CUDA Version 10.2.300"
    return text.rsplit(" ", 1)[-1] if text.startswith("CUDA Version") else ""


def board_info(root: Path | str = "/") -> BoardInfo:
    root = Path(root)
    compatible = [c for c in (read_text(root / "proc/device-tree/compatible") or "").split("\0") if c]
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")), "")
    module = compatible[0].split(",", 1)[-1] if compatible else ""
    l4t = l4t_release(root)
    trt_packages = ("libnvinfer10", "libnvinfer8", "tensorrt")
    packages = _dpkg_versions(root, (*trt_packages, "nvidia-l4t-core"))
    if not l4t and "nvidia-l4t-core" in packages:
        l4t = packages["nvidia-l4t-core"]
    tensorrt = next((packages[p] for p in trt_packages if p in packages), "")
    return BoardInfo(board=read_text(root / "proc/device-tree/model") or "", module=module, soc=soc, l4t=l4t,
                     jetpack=jetpack_for(l4t), cuda=_cuda_version(root), tensorrt=tensorrt)


def nvpmodel_names(root: Path) -> dict[int, str]:
    text = read_file(root / "etc/nvpmodel.conf") or ""
    return {int(i): name for i, name in _POWER_MODEL.findall(text)}


def nvpmodel_mode(root: Path, names: dict[int, str] | None = None) -> tuple[int, str] | None:
    match = _PMODE.search(read_text(root / "var/lib/nvpmodel/status") or "")
    if not match:
        return None
    mode = int(match.group(1))
    return mode, (nvpmodel_names(root) if names is None else names).get(mode, "")


def _cpu_list(text: str | None) -> set[int] | None:
    """``0-3,5`` -> {0, 1, 2, 3, 5}."""
    if text is None:
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return None
    return out


@dataclass(frozen=True)
class _Cpu:
    label: str
    online: str | None  # None: no online file (cpu0), the kernel's online list decides
    cur: str
    lo: str
    hi: str


def _cores(root: Path) -> tuple[str, list[_Cpu]]:
    """The kernel's online list file, and every core's files."""
    base = root / "sys/devices/system/cpu"
    return str(base / "online"), [
        _Cpu(c.name[3:], str(c / "online") if (c / "online").exists() else None, str(c / "cpufreq/scaling_cur_freq"),
             str(c / "cpufreq/scaling_min_freq"), str(c / "cpufreq/scaling_max_freq")) for c in numbered(base, "cpu")]


def _online(cpu: _Cpu, online_list: set[int] | None) -> int | None:
    if cpu.online is not None:
        return read_int(cpu.online)
    if online_list is None:
        return 1 if cpu.label == "0" else None  # cpu0 cannot go offline
    return 1 if int(cpu.label) in online_list else 0


def _gpu_devfreqs(root: Path) -> list[tuple[str, Path]]:
    out = []
    for d in sorted((root / "sys/class/devfreq").glob("*")):
        node = read_text(d / "device/of_node/name")
        if node in GPU_NODES:
            out.append((node, d))
    return out


def _pinned(limits: list[tuple[int | None, int | None]]) -> bool | None:
    """jetson_clocks sets every clock's floor to its ceiling; None when no limit was readable."""
    known = [(lo, hi) for lo, hi in limits if lo is not None and hi is not None]
    if not known:
        return None
    return all(lo == hi for lo, hi in known)


def clock_state(root: Path | str = "/") -> ClockState:
    """nvpmodel mode (id, name) and whether jetson_clocks is on, from files any user can read.

    For callers that record the conditions of a measurement (selftest, engine build records).
    """
    root = Path(root)
    mode = nvpmodel_mode(root)
    list_file, cores = _cores(root)
    online_list = _cpu_list(read_text(list_file))
    limits = [(read_int(c.lo), read_int(c.hi)) for c in cores if _online(c, online_list) == 1]
    limits += [(read_int(d / "min_freq"), read_int(d / "max_freq")) for _, d in _gpu_devfreqs(root)]
    return ClockState(mode_id=mode[0] if mode else None, mode_name=mode[1] if mode else "",
                      jetson_clocks=_pinned(limits))


def clock_record(root: Path | str = "/") -> dict | None:
    """The clock state as a JSON-safe record on a Jetson (None elsewhere), for build records."""
    if not_jetson_reason(root) is not None:
        return None
    state = clock_state(root)
    return {"nvpmodel_mode": state.mode_id, "nvpmodel_name": state.mode_name, "jetson_clocks": state.jetson_clocks}


def clock_warning(state: ClockState) -> str | None:
    """Why timings taken now are not comparable (None when the clocks are pinned at their maximum)."""
    if state.jetson_clocks is not False:
        return None
    mode = f"nvpmodel mode {state.mode_id} ({state.mode_name or 'unnamed'})" if state.mode_id is not None else "nvpmodel mode unknown"
    return (f"clocks are not pinned to their maximum (jetson_clocks is off, {mode}): DVFS moves latencies and "
            "TensorRT's tactic timings; run `sudo jetson_clocks` (and `sudo nvpmodel -m 0` for MAXN) for comparable figures")


@dataclass(frozen=True)
class _Rail:
    label: str
    voltage: str   # inN_input, mV
    current: str   # currN_input, mA


class JetsonTelemetry:
    """One Jetson's readings; ``read()`` returns the current values of everything readable.

    Which files exist (chips, zones, rails, cores) is settled once here; their paths are kept
    as strings, since joining paths cost as much as the reads themselves at ~150 files a period.
    """

    def __init__(self, root: Path | str = "/") -> None:
        self.root = root = Path(root)
        self.info = board_info(root)
        self._gpus = [(name, str(d / "device/load"), str(d / "cur_freq"), str(d / "min_freq"), str(d / "max_freq"))
                      for name, d in _gpu_devfreqs(root)]
        self._cpu_list, self._cpus = _cores(root)
        thermal = root / "sys/devices/virtual/thermal"
        self._zones = []  # (zone name, temp file, ((trip index, trip type, trip temp file), ...))
        for z in numbered(thermal, "thermal_zone"):
            trips = sorted(((t.name.split("_")[2], t) for t in z.glob("trip_point_*_temp")), key=lambda x: int(x[0]))
            self._zones.append((read_text(z / "type") or z.name, str(z / "temp"), tuple(
                (index, read_text(z / f"trip_point_{index}_type") or "", str(t)) for index, t in trips)))
        self._cooling = [((c.name, read_text(c / "type") or ""), str(c / "cur_state"), str(c / "max_state"))
                         for c in numbered(thermal, "cooling_device")]
        self._rails: list[_Rail] = []
        self._fans: list[tuple[str, str]] = []
        self._tachs: list[str] = []
        self._overcurrent: list[tuple[str, str]] = []
        for hwmon in numbered(root / "sys/class/hwmon", "hwmon"):
            name = read_text(hwmon / "name")
            if name == "ina3221":
                for n in (1, 2, 3):  # in4-6 are shunt voltages, in7/curr4 the sum: not rails
                    label = read_text(hwmon / f"in{n}_label")
                    if label and label != "NC":
                        self._rails.append(_Rail(label, str(hwmon / f"in{n}_input"), str(hwmon / f"curr{n}_input")))
            elif name == "pwmfan":
                self._fans.extend((pwm.name[3:], str(pwm)) for pwm in sorted(hwmon.glob("pwm[0-9]")))
            elif name == "pwm_tach":
                self._tachs.append(str(hwmon / "rpm"))
            elif name == "soctherm_oc":
                self._overcurrent.extend((c.name.split("_")[0], str(c)) for c in sorted(hwmon.glob("oc*_event_cnt")))
        self._emc_rate = self._first_file("sys/kernel/debug/bpmp/debug/clk/emc/rate",
                                          "sys/kernel/debug/clk/emc/clk_rate", "sys/class/devfreq/bwmgr/cur_freq")
        self._emc_max = self._first_file("sys/kernel/debug/bpmp/debug/clk/emc/max_rate", "sys/class/devfreq/bwmgr/max_freq")
        self._emc_cap = str(root / "sys/kernel/nvpmodel_emc_cap/emc_iso_cap")
        self._emc_activity = self._first_file("sys/kernel/debug/cactmon/mc_all",
                                              "sys/kernel/debug/bpmp/debug/actmon/mc_all_avg_activity",
                                              "sys/kernel/actmon_avg_activity/mc_all")
        self._meminfo = str(root / "proc/meminfo")
        self._nvpmodel_names = nvpmodel_names(root)

    def _first_file(self, *candidates: str) -> str | None:
        return next((str(self.root / c) for c in candidates if (self.root / c).exists()), None)

    def read(self) -> list[Reading]:
        out: list[Reading] = []

        def add(metric: m.DeviceMetric, labels: tuple[str, ...], value: float | None, times: float = 1,
                per: float = 1) -> None:
            if value is not None:
                out.append((metric, labels, value * times / per))

        i = self.info
        add(m.JETSON_INFO, (i.board, i.module, i.soc, i.l4t, i.jetpack, i.cuda, i.tensorrt), 1)
        limits: list[tuple[int | None, int | None]] = []
        for name, load, cur, lo_file, hi_file in self._gpus:
            add(m.JETSON_GPU_LOAD, (name,), read_int(load), per=1000)  # 0-1000
            add(m.JETSON_GPU_FREQ, (name,), read_int(cur))
            lo, hi = read_int(lo_file), read_int(hi_file)
            add(m.JETSON_GPU_FREQ_MIN, (name,), lo)
            add(m.JETSON_GPU_FREQ_MAX, (name,), hi)
            limits.append((lo, hi))
        self._read_emc(add)
        online_list = _cpu_list(read_text(self._cpu_list)) if any(c.online is None for c in self._cpus) else None
        for cpu in self._cpus:
            label = (cpu.label,)
            online = _online(cpu, online_list)
            add(m.JETSON_CPU_ONLINE, label, online)
            if online != 0:  # offline cores have no cpufreq files to read
                add(m.JETSON_CPU_FREQ, label, read_int(cpu.cur), times=1000)  # kHz
                lo, hi = read_int(cpu.lo), read_int(cpu.hi)
                add(m.JETSON_CPU_FREQ_MIN, label, lo, times=1000)
                add(m.JETSON_CPU_FREQ_MAX, label, hi, times=1000)
                limits.append((lo, hi))
        self._read_memory(add)
        for zone, temp_file, trips in self._zones:
            temp = read_int(temp_file)
            if temp is not None and temp / 1e3 > _UNPOWERED_C:
                add(m.JETSON_TEMPERATURE, (zone,), temp, per=1000)  # m°C
            for index, kind, trip_file in trips:
                add(m.JETSON_TRIP, (zone, index, kind), read_int(trip_file), per=1000)
        for labels, cur, top in self._cooling:
            add(m.JETSON_COOLING_STATE, labels, read_int(cur))
            add(m.JETSON_COOLING_MAX_STATE, labels, read_int(top))
        for event, counter in self._overcurrent:
            add(m.JETSON_OVERCURRENT, (event,), read_int(counter))
        self._read_power(add)
        for fan, pwm in self._fans:
            add(m.JETSON_FAN_PWM, (fan,), read_int(pwm), per=255)
        for n, rpm in enumerate(self._tachs, start=1):
            add(m.JETSON_FAN_RPM, (str(n),), read_int(rpm))
        mode = nvpmodel_mode(self.root, self._nvpmodel_names)
        if mode is not None:
            add(m.JETSON_NVPMODEL, (str(mode[0]), mode[1]), 1)
        pinned = _pinned(limits)
        if pinned is not None:
            add(m.JETSON_CLOCKS, (), 1 if pinned else 0)
        return out

    def _read_emc(self, add) -> None:
        rate = read_int(self._emc_rate) if self._emc_rate else None
        add(m.JETSON_EMC_FREQ, (), rate)
        if self._emc_max:
            top = read_int(self._emc_max)
            cap = read_int(self._emc_cap)
            if top is not None and cap:
                top = min(top, cap)
            add(m.JETSON_EMC_FREQ_MAX, (), top)
        activity = read_int(self._emc_activity) if self._emc_activity else None
        if activity is not None and rate:
            # jtop's scale: activity / clock in kHz is a percentage.
            add(m.JETSON_EMC_LOAD, (), min(1.0, activity / (rate / 1e3) / 100))

    def _read_memory(self, add) -> None:
        info: dict[str, int] = {}
        for line in read_lines(self._meminfo):
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                info[key] = int(fields[0]) * 1024  # kB
        total = info.get("MemTotal")
        add(m.JETSON_MEM_TOTAL, (), total)
        parts = [info.get(k) for k in ("MemFree", "Buffers", "Cached")]
        if total is not None and None not in parts:
            add(m.JETSON_MEM_USED, (), total - sum(parts))
        add(m.JETSON_MEM_AVAILABLE, (), info.get("MemAvailable"))
        add(m.JETSON_SWAP_TOTAL, (), info.get("SwapTotal"))
        if "SwapTotal" in info and "SwapFree" in info:
            add(m.JETSON_SWAP_USED, (), info["SwapTotal"] - info["SwapFree"])
        add(m.JETSON_NVMAP_USED, (), info.get("NvMapMemUsed"))

    def _read_power(self, add) -> None:
        powers: dict[str, float | None] = {}
        for rail in self._rails:
            mv, ma = read_int(rail.voltage), read_int(rail.current)
            add(m.JETSON_RAIL_VOLTAGE, (rail.label,), mv, per=1000)
            add(m.JETSON_RAIL_CURRENT, (rail.label,), ma, per=1000)
            powers[rail.label] = mv * ma / 1e6 if mv is not None and ma is not None else None
            add(m.JETSON_RAIL_POWER, (rail.label,), powers[rail.label])
        if not powers:
            return
        # VDD_IN is the module's input where it is measured; elsewhere the rails are the whole.
        if "VDD_IN" in powers:
            add(m.JETSON_POWER, (), powers["VDD_IN"])
        elif None not in powers.values():
            add(m.JETSON_POWER, (), sum(powers.values()))
