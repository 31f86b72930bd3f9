"""CPU cost of device telemetry: one collection period (read every file, publish the snapshot) and one
scrape with and without the device series, side by side in one run, on the recorded Jetson trees.

    .venv/bin/python bench/telemetry_cost.py [--rounds 2000]

The fixture trees are regular files; on a Jetson, sysfs reads of hwmon and devfreq values go through
their drivers, so run it there with --root / (as the tegrad user) for the device's own figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import REGISTRY, generate_latest  # noqa: E402

from bench.tables import say, table  # noqa: E402
from daemon.telemetry import metrics  # noqa: E402
from daemon.telemetry.collector import DeviceTelemetry  # noqa: E402
from daemon.telemetry.jetson import JetsonTelemetry, not_jetson_reason  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests/telemetry/fixtures"


def cpu_us(fn, rounds: int) -> float:
    fn()  # warm the page cache and the code paths
    start = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - start) / rounds * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--root", type=Path, action="append", help="a tree to read (default: the three fixtures)")
    args = parser.parse_args()
    roots = args.root or sorted(p for p in FIXTURES.iterdir() if p.is_dir())
    # A served model's own series, so the scrape compares against a realistic exposition.
    for stage in metrics.STAGES:
        metrics.REQUEST_DURATION.labels("digits", "1", stage).observe(0.001)
    for outcome in metrics.OUTCOMES:
        metrics.REQUESTS.labels("digits", "1", outcome).inc()
    metrics.set_model_state("digits", "1", "READY")

    rows = []
    for root in roots:
        if not_jetson_reason(root):
            say(f"{root}: {not_jetson_reason(root)}; skipped")
            continue
        telemetry = DeviceTelemetry([JetsonTelemetry(root)], period=1.0)
        collect = cpu_us(telemetry.collect, args.rounds)
        series = sum(1 for _ in metrics.DEVICE.collect() for _ in _.samples)
        with_device = cpu_us(lambda: generate_latest(REGISTRY), args.rounds)
        size_with = len(generate_latest(REGISTRY))
        metrics.DEVICE.clear()
        without = cpu_us(lambda: generate_latest(REGISTRY), args.rounds)
        size_without = len(generate_latest(REGISTRY))
        rows.append([root.name, series, f"{collect:.0f}", f"{collect / 1e4:.3f} %", f"{without:.0f}", f"{with_device:.0f}",
                     f"{with_device / without:.2f}x", f"{size_without} -> {size_with}"])
    say(table(["tree", "device series", "collect CPU us", "of one core at 1 s", "scrape us (no device)",
               "scrape us (device)", "ratio", "exposition bytes"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
