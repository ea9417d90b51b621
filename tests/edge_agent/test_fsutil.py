"""edge_agent/fsutil.py: atomic writes leave no temp files, symlinks switch by rename, trees vanish atomically."""

from __future__ import annotations

import os

import pytest

from edgefleet.edge_agent import fsutil


def test_atomic_write_replaces_and_cleans(tmp_path):
    path = tmp_path / "sub" / "f.json"
    fsutil.atomic_write_json(path, {"a": 1})
    fsutil.atomic_write_bytes(path, b'{"a": 2}', mode=0o600)
    assert fsutil.read_json(path) == {"a": 2}
    assert os.listdir(path.parent) == ["f.json"]


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    fsutil.atomic_write_bytes(path, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError):
        fsutil.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_atomic_symlink_switch(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    fsutil.atomic_symlink("1", tmp_path / "current")
    fsutil.atomic_symlink("2", tmp_path / "current")
    assert os.readlink(tmp_path / "current") == "2"
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "current"]


def test_remove_tree_and_collect_trash(tmp_path):
    (tmp_path / "v" / "deep").mkdir(parents=True)
    fsutil.remove_tree(tmp_path / "v")
    fsutil.remove_tree(tmp_path / "missing")
    assert os.listdir(tmp_path) == []
    (tmp_path / ".trash-x-1234").mkdir()
    (tmp_path / ".f.tmp-abcd").write_bytes(b"")
    assert fsutil.collect_trash(tmp_path) == 2 and os.listdir(tmp_path) == []
