"""The alert rules fire where they should and stay quiet on near misses: promtool's rule unit tests
(tests/telemetry/alert_rules_test.yml) run against deploy/prometheus/tegrad-rules.yml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_alerts_fire_on_their_conditions_only():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): the rule unit tests need it")
    result = subprocess.run([promtool, "test", "rules", str(HERE / "alert_rules_test.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
