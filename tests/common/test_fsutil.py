"""common/fsutil.py: atomic writes leave no temp files, symlinks switch by rename, trees vanish atomically."""

from __future__ import annotations

import os

import pytest

from edgefleet.common import fsutil


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


def test_every_write_fsyncs_the_file_and_the_folder(tmp_path, monkeypatch):
    synced_dirs, synced_fds = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: synced_dirs.append(os.path.realpath(p)))
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (synced_fds.append(fd), real_fsync(fd)))
    fsutil.atomic_write_bytes(tmp_path / "a", b"1")
    assert synced_fds and synced_dirs == [os.path.realpath(tmp_path)]


def test_mode_is_exact_from_the_first_byte(tmp_path, monkeypatch):
    seen = []
    real_write = fsutil.StagedFile.commit

    def spy(self, target, **kw):
        seen.append(os.stat(self.path).st_mode & 0o777)  # the temp file, before it gets its name
        return real_write(self, target, **kw)

    monkeypatch.setattr(fsutil.StagedFile, "commit", spy)
    old = os.umask(0o000)  # a permissive umask must not loosen a secret's mode
    try:
        fsutil.atomic_write_text(tmp_path / "token", "secret\n", 0o600)
    finally:
        os.umask(old)
    assert seen == [0o600] and os.stat(tmp_path / "token").st_mode & 0o777 == 0o600


def test_exclusive_write_keeps_the_first(tmp_path):
    assert fsutil.atomic_write_bytes(tmp_path / "key", b"first", exclusive=True) is True
    assert fsutil.atomic_write_bytes(tmp_path / "key", b"second", exclusive=True) is False
    assert (tmp_path / "key").read_bytes() == b"first" and os.listdir(tmp_path) == ["key"]


def test_staged_file_commits_elsewhere_and_cleans_up_on_error(tmp_path):
    (tmp_path / "ab").mkdir()
    with fsutil.staged_file(tmp_path) as staged:
        staged.file.write(b"blob")
        assert staged.path.name.startswith(".tmp-")
        assert staged.commit(tmp_path / "ab" / "abcd") is True
    assert (tmp_path / "ab" / "abcd").read_bytes() == b"blob" and sorted(os.listdir(tmp_path)) == ["ab"]
    with pytest.raises(RuntimeError):
        with fsutil.staged_file(tmp_path, hint="x") as staged:
            staged.file.write(b"half")
            raise RuntimeError("the writer died")
    with fsutil.staged_file(tmp_path) as staged:
        staged.file.write(b"never committed")
    assert sorted(os.listdir(tmp_path)) == ["ab"]
