"""Printing for the bench scripts: progress lines that show at once, and plain-text tables."""

from __future__ import annotations

from typing import Any


def say(msg: str = "") -> None:
    print(msg, flush=True)


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """Columns padded to their widest cell; ``align`` per column, 'l' or 'r' (default: first left, rest right)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells)])
