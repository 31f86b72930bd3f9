"""Progress bars with an ETA on stderr for the long calibration phases (tqdm), silenced by one flag.

Library code takes a ``progress`` callback, ``(done, total, note) -> None``, called after each
step (``total`` None when unknown); the command line passes one made by :func:`reporter`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

ProgressCallback = Callable[[int, "int | None", str], None]


def _quiet(done: int, total: int | None, note: str = "") -> None:
    return None


def reporter(desc: str, enabled: bool = True, unit: str = "step") -> ProgressCallback:
    """A callback drawing one tqdm bar named ``desc``; the bar closes when ``done`` reaches ``total``."""
    if not enabled:
        return _quiet
    from tqdm import tqdm

    state: dict = {"bar": None}

    def update(done: int, total: int | None, note: str = "") -> None:
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        if note:
            bar.set_postfix_str(note, refresh=False)
        bar.refresh()
        if total is not None and done >= total:
            bar.close()
            state["bar"] = None

    return update


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "step", leave: bool = True):
    """A tqdm bar on stderr (or a silent stand-in with the same ``update``/``close``/``set_postfix_str``)."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave)


class _Silent:
    n = 0
    total = None

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args, **kwargs) -> None:
        return None

    def set_description_str(self, *args, **kwargs) -> None:
        return None

    def refresh(self) -> None:
        return None

    def close(self) -> None:
        return None
