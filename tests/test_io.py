"""Atomic writes of pruneshot.io: results get the mode the umask gives, like any file a program writes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pruneshot.io import atomic_path, load_tensors, read_json, save_tensors, write_json, write_text


@pytest.fixture(params=[(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)], ids=lambda p: oct(p[0]))
def umask(request) -> Iterator[int]:
    """Run the test under a umask; yields the mode a new file must get (0666 & ~umask)."""
    mask, mode = request.param
    old = os.umask(mask)
    try:
        yield mode
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    write_text(tmp_path / "a.txt", "text\n")
    write_json(tmp_path / "sub/b.json", {"x": 1})
    save_tensors(tmp_path / "c.safetensors", {"w": torch.ones(2)})
    with atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"\0")
    for name in ("a.txt", "sub/b.json", "c.safetensors", "d.bin"):
        assert oct(_mode(tmp_path / name)) == oct(umask), name
    assert read_json(tmp_path / "sub/b.json") == {"x": 1}
    assert torch.equal(load_tensors(tmp_path / "c.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "c.safetensors", "d.bin", "sub"]


def test_an_overwritten_file_gets_the_mode_the_umask_gives(tmp_path, umask):
    path = tmp_path / "a.txt"
    path.write_text("old\n")
    path.chmod(0o600)
    write_text(path, "new\n")
    assert path.read_text() == "new\n" and oct(_mode(path)) == oct(umask)


def test_create_temp_makes_a_new_file_each_time(tmp_path, umask):
    from pruneshot.io import create_temp

    fds_paths = [create_temp(tmp_path, ".x.", ".tmp") for _ in range(20)]
    for fd, path in fds_paths:
        os.write(fd, b"1")
        os.close(fd)
        assert path.parent == tmp_path and path.name.startswith(".x.") and path.name.endswith(".tmp")
        assert oct(_mode(path)) == oct(umask) and path.read_bytes() == b"1"
    assert len({p for _, p in fds_paths}) == 20


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
