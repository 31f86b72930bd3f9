"""What a model name may be, checked before it reaches the file system.

A model name is a directory name in the repository, so it follows the rules a
file name on the device has (and that Triton's repositories live by): at most
255 bytes of UTF-8, no ``/`` or ``\\``, not ``.`` or ``..``, no NUL or other
control characters. The empty name is left to the caller (it means "all
models" to ModelStatistics and "not found" elsewhere).
"""

from __future__ import annotations

import unicodedata

from daemon.errors import InvalidArgument

MAX_BYTES = 255
_SHOWN = 64  # how much of a bad name an error message echoes back


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def check(name: str | bytes | memoryview) -> str:
    """The name as text; InvalidArgument with the rule it breaks otherwise."""
    size = len(name.encode("utf-8", "surrogatepass")) if isinstance(name, str) else len(name)
    if size > MAX_BYTES:
        raise InvalidArgument(f"model name is {size} bytes long; model names are at most {MAX_BYTES} bytes "
                              "(they are directory names in the repository)")
    if isinstance(name, str):
        text = name
    else:
        try:
            text = bytes(name).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"model name is not valid UTF-8 (byte {exc.start}); send the name as UTF-8 text") from None
    reason = _broken_rule(text)
    if reason:
        raise InvalidArgument(f"model name {_shown(text)} {reason}; model names are directory names in the repository")
    return text


def _broken_rule(text: str) -> str:
    if text in (".", ".."):
        return "is a relative directory"
    if "/" in text or "\\" in text:
        return "contains a path separator"
    for ch in text:
        if ch == "\0":
            return "contains a NUL character"
        category = unicodedata.category(ch)
        if category == "Cc":
            return f"contains the control character U+{ord(ch):04X}"
        if category == "Cs":
            return "contains a lone surrogate (not valid UTF-8)"
    return ""
