"""Fixture sysfs trees (tests/fixtures/energy), copied so a test can write counter and sensor values into them."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "energy"


@pytest.fixture
def tree(tmp_path):
    """`tree("intel-x86-rapl")` -> a private copy's `sys` directory, symlinks kept as the kernel lays them."""

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(FIXTURES / name, dest, symlinks=True)
        return dest / "sys"

    return copy


def write(path: Path, value: int | str) -> None:
    path.write_text(f"{value}\n")


def unprivileged_read(path: Path) -> str:
    """Read as a process without root would: the kernel refuses a file with no read bit for it. Tests run as root
    in CI, where a chmod 000 file stays readable, so this stands in for that check, on the same code path."""
    mode = os.stat(path).st_mode
    if os.geteuid() == 0 and not mode & (stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH):
        raise PermissionError(13, "Permission denied", str(path))
    with open(path, encoding="ascii") as f:
        return f.read().strip()
