"""Atomic file writes, hashing and safetensors/JSON I/O. Nothing here unpickles."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def create_temp(directory: Path | str, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """Create a new, empty file in ``directory`` and open it for writing: (fd, path). Like
    ``tempfile.mkstemp``, but with the mode the umask gives (0666 & ~umask, as ``open`` gives), not 0600:
    the file is renamed onto a result that others may need to read."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(tempfile.TMP_MAX):
        path = Path(directory) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success. The file gets the
    mode the umask gives (0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = create_temp(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path | str, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented, trailing newline)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: Path | str) -> Any:
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: Path | str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Save a dict of torch tensors as safetensors, atomically (the bytes of ``save_file``, but written by
    :func:`atomic_path`: ``save_file`` renames a temporary file of mode 0600 onto its path)."""
    from safetensors.torch import save

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(contiguous, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_tensors(path: Path | str, device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file into a dict of torch tensors."""
    from safetensors.torch import load_file

    return load_file(str(path), device=device)
