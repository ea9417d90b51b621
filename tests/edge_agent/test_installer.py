"""edge_agent/installer.py: versioned dirs, the current pointer, previous kept, staging and garbage collection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefleet.edge_agent.installer import Installer


def staged(inst: Installer, name: str, version: int) -> Path:
    staging = inst.new_staging(name, version)
    (staging / "model.onnx").write_bytes(f"v{version}".encode())
    return staging


def test_promote_activate_and_previous(tmp_path):
    inst = Installer(tmp_path / "models")
    assert inst.active_version("m") is None and inst.active_dir("m") is None
    inst.promote("m", 1, staged(inst, "m", 1))
    inst.activate("m", 1, previous=None)
    assert inst.active_version("m") == 1 and inst.active_dir("m") == tmp_path / "models" / "m" / "1"
    assert os.readlink(tmp_path / "models" / "m" / "current") == "1"  # relative: the data dir can move
    inst.promote("m", 2, staged(inst, "m", 2))
    inst.activate("m", 2, previous=1)
    assert (inst.active_version("m"), inst.previous_version("m")) == (2, 1)
    assert inst.installed() == {"m": (1, 2)} and inst.active() == {"m": 2}
    assert (inst.active_dir("m") / "model.onnx").read_bytes() == b"v2"
    with pytest.raises(ValueError):
        inst.remove_version("m", 1)  # previous is pinned


def test_promote_is_idempotent(tmp_path):
    inst = Installer(tmp_path / "models")
    staging = staged(inst, "m", 1)
    inst.promote("m", 1, staging)
    inst.promote("m", 1, staging)  # resumed activate: staging gone, final present
    assert inst.versions("m") == (1,)
    with pytest.raises(FileNotFoundError):
        inst.promote("m", 2, tmp_path / "nowhere")


def test_gc_keeps_current_previous_and_pinned(tmp_path):
    inst = Installer(tmp_path / "models")
    for v in (1, 2, 3, 4):
        inst.promote("m", v, staged(inst, "m", v))
    inst.activate("m", 3, previous=2)
    stale = staged(inst, "m", 5)
    keep = staged(inst, "m", 6)
    (tmp_path / "models" / "m" / ".trash-1-abcd").mkdir()
    removed = inst.gc(keep={"m": {4}}, keep_staging={str(keep)})
    assert inst.versions("m") == (2, 3, 4)
    assert not stale.exists() and keep.exists()
    assert not (tmp_path / "models" / "m" / ".trash-1-abcd").exists()
    assert "m/1" in removed


def test_bad_names_cannot_escape(tmp_path):
    inst = Installer(tmp_path / "models")
    with pytest.raises(ValueError):
        inst.model_dir("../etc")
    inst.remove_staging(tmp_path / "elsewhere")  # outside the tree: ignored, never deleted
    assert inst.names() == []


def test_remove_model_and_deactivate(tmp_path):
    inst = Installer(tmp_path / "models")
    inst.promote("m", 1, staged(inst, "m", 1))
    inst.activate("m", 1, previous=None)
    inst.deactivate("m")
    assert inst.active_version("m") is None and inst.versions("m") == (1,)
    inst.remove_model("m")
    assert inst.names() == []
