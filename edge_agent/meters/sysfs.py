"""Reading sysfs attributes: one small file, one integer or one line, every failure named with its path.

Theory of operation: each meter reads its files through `read_text`, a parameter (default `read_attr`), so tests
can point a meter at a fixture tree laid out as on the board, and stand in for the kernel's permission checks when
they run as root (root reads a 0000 file; the agent, not root, would not).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

ReadText = Callable[[Path], str]


def read_attr(path: Path) -> str:
    """The attribute's text, stripped. sysfs files are a page at most; reading them whole is one syscall."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()


def read_int(path: Path, read_text: ReadText = read_attr) -> int:
    text = read_text(path)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an integer, read {text[:40]!r}") from None


def read_optional(path: Path, read_text: ReadText = read_attr) -> str | None:
    try:
        return read_text(path)
    except FileNotFoundError:
        return None
