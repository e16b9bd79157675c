"""How an ``imagefolder`` root is listed: its class folders and their image files.

Standard library only: :mod:`pruneshot.config` lists roots with it before any job starts, and
:mod:`pruneshot.data.formats` reads the images of the same listing, so the two cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
"""File name endings (any case) read as images; other files in a class folder are ignored."""


def class_folder_names(root: Path | str) -> list[str]:
    """Names of the sub-folders of ``root``, sorted: class index ``i`` is the ``i``-th of them.

    Raises OSError when ``root`` cannot be listed."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def class_images(folder: Path | str) -> list[Path]:
    """The image files of one class folder (by extension, :data:`IMAGE_EXTENSIONS`), sorted by name.

    Raises OSError when ``folder`` cannot be listed."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
