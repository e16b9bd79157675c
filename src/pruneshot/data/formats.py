"""Readers for raw dataset file formats; each returns ``(x uint8 (N, C, H, W), y int64 (N,))``.

Nothing here unpickles data: IDX and CIFAR are parsed as raw bytes, SVHN via ``scipy.io.loadmat``.
"""

from __future__ import annotations

import gzip
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from pruneshot.data.folders import IMAGE_EXTENSIONS, class_folder_names, class_images

_CIFAR_PIXELS = 3 * 32 * 32


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: unreadable or truncated gzip file ({e})") from e


def _idx_payload(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], bytes]:
    """Check an IDX header and return (dims, payload bytes)."""
    raw = _read_gz(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header})")
    got = struct.unpack(">i", raw[:4])[0]
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic {got}, expected {magic}")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    need = int(np.prod(dims))
    payload = raw[header:]
    if len(payload) != need:
        raise ValueError(f"{path}: truncated IDX file: header {dims} needs {need} bytes, found {len(payload)}")
    return dims, payload


def read_idx_gz(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read MNIST-style gzip IDX images (magic 2051) and labels (magic 2049)."""
    images_path, labels_path = Path(images_path), Path(labels_path)
    (n, h, w), pix = _idx_payload(images_path, 2051, 3)
    (m,), lab = _idx_payload(labels_path, 2049, 1)
    if n != m:
        raise ValueError(f"count mismatch: {images_path} has {n} images, {labels_path} has {m} labels")
    x = torch.from_numpy(np.frombuffer(pix, dtype=np.uint8).reshape(n, 1, h, w).copy())
    y = torch.from_numpy(np.frombuffer(lab, dtype=np.uint8).astype(np.int64))
    return x, y


def read_cifar_binary_tar(tar_gz_path: Path, members: list[str], label_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR binary batches from a tar.gz without extracting.

    ``label_bytes`` is 1 for CIFAR-10 and 2 for CIFAR-100 (coarse, fine; the fine label is used).
    """
    tar_gz_path = Path(tar_gz_path)
    if label_bytes not in (1, 2):
        raise ValueError(f"label_bytes must be 1 or 2, got {label_bytes}")
    rec = label_bytes + _CIFAR_PIXELS
    xs, ys = [], []
    try:
        with tarfile.open(tar_gz_path, "r:gz") as tar:
            for name in members:
                try:
                    f = tar.extractfile(name)
                except KeyError:
                    raise ValueError(f"{tar_gz_path}: member {name!r} not found") from None
                if f is None:
                    raise ValueError(f"{tar_gz_path}: member {name!r} is not a regular file")
                data = f.read()
                if not data or len(data) % rec:
                    raise ValueError(
                        f"{tar_gz_path}: member {name!r} has {len(data)} bytes, not a multiple of the "
                        f"{rec}-byte record size"
                    )
                arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, rec)
                ys.append(arr[:, label_bytes - 1].astype(np.int64))
                xs.append(arr[:, label_bytes:].reshape(-1, 3, 32, 32))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{tar_gz_path}: unreadable or truncated archive ({e})") from e
    if not xs:
        raise ValueError(f"{tar_gz_path}: no members requested")
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an SVHN cropped-digits .mat file (X: 32x32x3xN, y: Nx1 with 10 meaning digit 0)."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt files
        raise ValueError(f"{path}: unreadable .mat file ({e})") from e
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables 'X' and 'y', found {sorted(k for k in mat if k[0] != '_')}")
    X, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: X has shape {X.shape}, expected (32, 32, 3, N)")
    if X.shape[3] != y.shape[0]:
        raise ValueError(f"{path}: count mismatch: {X.shape[3]} images, {y.shape[0]} labels")
    x = np.ascontiguousarray(X.astype(np.uint8).transpose(3, 2, 0, 1))
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    return torch.from_numpy(x), torch.from_numpy(labels)


def image_folder_classes(root: Path) -> list[str]:
    """Class folder names of ``root/<class>/<image>``, sorted (the label of a folder is its index here)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    names = class_folder_names(root)
    if not names:
        raise ValueError(f"image folder {root} has no class folders")
    return names


def image_folder_files(root: Path, classes: list[int] | None = None) -> list[tuple[int, Path]]:
    """(label, path) of every image of the selected class indices (all when None), sorted by class, then name.

    Raises ValueError for a missing root, no class folders, an index beyond the folders present, or
    a selected class folder without images.
    """
    root = Path(root)
    names = image_folder_classes(root)
    wanted = list(range(len(names))) if classes is None else sorted(set(classes))
    beyond = [c for c in wanted if not 0 <= c < len(names)]
    if beyond:
        raise ValueError(
            f"image folder {root}: class indices {beyond} do not exist; it has {len(names)} class folders "
            f"(0..{len(names) - 1}: {', '.join(names)})"
        )
    out: list[tuple[int, Path]] = []
    for label in wanted:
        cdir = root / names[label]
        files = class_images(cdir)
        if not files:
            raise ValueError(f"class folder {cdir} contains no images ({'/'.join(IMAGE_EXTENSIONS)})")
        out.extend((label, fp) for fp in files)
    return out


def read_image_folder(
    root: Path, image_size: int, channels: int, classes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``root/<class>/<image>`` (classes sorted by name -> 0..K-1), resized bilinearly.

    Images are converted by PIL (``L``: ITU-R 601-2 luma, or ``RGB``) and resized to
    ``image_size`` x ``image_size``. ``classes`` selects folder indices to read (all when None);
    labels are always the folder index.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    xs, ys = [], []
    for label, fp in image_folder_files(root, classes):
        try:
            with Image.open(fp) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"unreadable image {fp}: {e}") from e
        xs.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
        ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)
