"""``tegrad perf``'s level parsing and perf_analyzer's stability rule (the load itself: tests/interop/test_new_user.py)."""

from __future__ import annotations

import argparse

import pytest

from daemon.perf import _stable, _Window, parse_levels


def test_levels_as_lists_and_inclusive_ranges():
    assert parse_levels("1,2,4") == [1, 2, 4]
    assert parse_levels("1:8:2") == [1, 3, 5, 7]
    assert parse_levels("2:4") == [2, 3, 4]
    assert parse_levels("100:300:100", float) == [100.0, 200.0, 300.0]
    for bad in ("0", "4:1", "1:4:0", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="1,2,4 or START:END"):
            parse_levels(bad)


def _window(t: float, n: int, latency: float) -> _Window:
    return _Window(t, t + 1, [latency] * n, 0, {}, 0.0)


def test_three_windows_within_the_percentage_are_stable():
    steady = [_window(0, 100, 0.010), _window(1, 104, 0.0104), _window(2, 97, 0.0098)]
    assert _stable(steady, 10)
    assert not _stable(steady[:2], 10)  # three are needed
    assert not _stable(steady, 2)
    slower = [*steady[:2], _window(2, 100, 0.013)]  # throughput steady, latency 30 % up
    assert not _stable(slower, 10)
    fewer = [*steady[:2], _window(2, 70, 0.010)]
    assert not _stable(fewer, 10)
    assert not _stable([*steady[:2], _window(2, 0, 0.0)], 10)  # a window without completions
