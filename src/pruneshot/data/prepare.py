"""Datasets prepared as a few safetensors shards plus a JSON manifest.

A prepared split holds ``x`` (uint8, N x C x H x W, raw pixel levels) and ``y``
(int64, N, labels re-indexed to 0..K-1 in the order of the configured classes),
plus ``orig_y`` (the dataset's own labels). The manifest records the dataset and its split,
the raw files read (with their sha256), the image conversion applied, the class list and
names, counts, pixel scale, normalisation statistics and the sha256 of every shard; they are
read back, verified, by :mod:`pruneshot.data.splits`.

Raw data comes from :func:`load_raw`: scikit-learn's bundled ``digits``; ``mnist``,
``fashion_mnist``, ``cifar10``, ``cifar100`` and ``svhn`` downloaded from their official
locations (or a configured mirror) into a cache directory and verified by sha256
(:mod:`pruneshot.data.registry` lists files and checksums); or ``imagefolder``, a directory of
class folders. Nothing is unpickled: IDX and CIFAR binary files are parsed as bytes, SVHN
``.mat`` via scipy, images via PIL (:mod:`pruneshot.data.formats`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruneshot.data.registry import CIFAR10_MEMBERS, CIFAR100_MEMBERS, DatasetSpec, get_spec, resolve_split
from pruneshot.io import save_tensors, sha256_file, write_json

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B used to turn RGB into one gray channel."""

DEFAULT_DOWNLOAD: dict[str, Any] = {"mirrors": {}, "checksums": {}, "attempts": 3, "timeout_s": 60,
                                    "min_rate_bps": 10000}
"""Download settings used when none are given (the schema defaults of ``data.download``)."""


class DatasetError(ValueError):
    """A dataset could not be fetched, read or selected; the message names dataset, split, file and problem."""


@dataclass(frozen=True)
class RawDataset:
    """A whole dataset split in memory.

    ``x``: images uint8 (N, C, H, W); ``y``: labels int64 (N,); ``max_value``: largest pixel level.
    ``split``: the dataset split held (train, test or all). ``files``: the raw files read, each
    ``{"file", "sha256", ...}``. ``class_names``: name of each label (index = label), if known.
    """

    x: np.ndarray
    y: np.ndarray
    max_value: int
    name: str
    split: str = "all"
    files: tuple[dict[str, Any], ...] = ()
    class_names: tuple[str, ...] | None = None


def load_raw(
    name: str,
    cache_dir: Path | str | None = None,
    *,
    split: str | None = None,
    role: str = "source",
    download: dict[str, Any] | None = None,
    root: Path | str | None = None,
    image: dict[str, Any] | None = None,
    classes: list[int] | None = None,
) -> RawDataset:
    """Load one split of a dataset by name.

    ``split`` None means the default for ``role`` (source: train, target: test; ``all`` where a
    dataset has no train/test split). Downloaded files go to ``cache_dir/<name>/`` (default
    ``data/cache``) and are fetched, with ``download`` settings (``mirrors``, ``checksums``,
    ``attempts``, ``timeout_s``, see config/schema.yaml), only when the cached copy is missing or
    fails its sha256. ``imagefolder`` needs ``root`` and ``image["size"]`` (images are read at that
    size, RGB unless ``image["channels"]`` is 1) and reads only the folders in ``classes``.
    Raises :class:`DatasetError` naming the dataset, file and problem.
    """
    spec = get_spec(name)
    split = resolve_split(name, split, role)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.uint8)[:, None, :, :]  # levels 0..16
        y = d.target.astype(np.int64)
        digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + y.astype("<i8").tobytes()).hexdigest()
        files = ({"file": "sklearn.datasets.load_digits", "sha256": digest},)
        return RawDataset(x=x, y=y, max_value=16, name=name, split=split, files=files,
                          class_names=spec.class_names)
    if name == "mnist10k":
        return _load_mnist10k(spec, split)
    if name == "imagefolder":
        return _load_image_folder(root, image or {}, classes)
    cache = Path(cache_dir if cache_dir is not None else "data/cache") / name
    paths = _fetch(spec, split, cache, {**DEFAULT_DOWNLOAD, **(download or {})})
    try:
        x, y = _read(spec, split, paths)
        x_np, y_np = x.numpy(), y.numpy()
        if tuple(x_np.shape[1:]) != spec.shape:
            raise ValueError(f"images have shape {tuple(x_np.shape[1:])}, expected {spec.shape}")
        if len(y_np) and not 0 <= int(y_np.min()) <= int(y_np.max()) < (spec.num_classes or 0):
            raise ValueError(f"labels span {int(y_np.min())}..{int(y_np.max())}, "
                             f"expected 0..{(spec.num_classes or 0) - 1}")
    except ValueError as e:
        # Files that passed their checksum but do not hold this dataset must not be taken as valid next time.
        removed = [p.name for p, _ in paths.values() if p.exists()]
        for p, _ in paths.values():
            p.unlink(missing_ok=True)
        raise DatasetError(
            f"dataset {name!r} (split {split!r}): cannot read the downloaded files: {e}; "
            f"removed {', '.join(removed)} from the cache {cache}"
        ) from e
    files = tuple({"file": fname, "size": p.stat().st_size, "sha256": sha} for fname, (p, sha) in paths.items())
    return RawDataset(x=x_np, y=y_np, max_value=spec.max_value, name=name, split=split, files=files,
                      class_names=spec.class_names)


def _load_mnist10k(spec: DatasetSpec, split: str) -> RawDataset:
    """The embedded 10,000 MNIST digits, each file checked against its pinned sha256 first."""
    from pruneshot.data import mnist10k
    from pruneshot.data.formats import read_idx_gz

    files = []
    for fname, pinned in mnist10k.FILES.items():
        path = mnist10k.EMBEDDED_DIR / fname
        if not path.is_file():
            raise DatasetError(f"dataset 'mnist10k': {path} is missing (rebuild: python -m pruneshot.data.mnist10k)")
        digest = sha256_file(path)
        if digest != pinned:
            raise DatasetError(f"dataset 'mnist10k': {path} has sha256 {digest}, expected {pinned}: the embedded file "
                               "is corrupt or was changed (rebuild: python -m pruneshot.data.mnist10k)")
        files.append({"file": fname, "size": path.stat().st_size, "sha256": digest})
    x, y = read_idx_gz(mnist10k.EMBEDDED_DIR / mnist10k.IMAGES, mnist10k.EMBEDDED_DIR / mnist10k.LABELS)
    return RawDataset(x=x.numpy(), y=y.numpy(), max_value=spec.max_value, name=spec.name, split=split,
                      files=tuple(files), class_names=spec.class_names)


def load_entry(entry: dict[str, Any], role: str, data_cfg: dict[str, Any]) -> RawDataset:
    """Load the dataset of a validated ``data.source`` / ``data.targets.<name>`` entry.

    ``data_cfg`` is the config's ``data`` section (cache_dir, download, image).
    """
    return load_raw(
        entry["dataset"], data_cfg.get("cache_dir"), split=entry.get("split"), role=role,
        download=data_cfg.get("download"), root=entry.get("root"), image=data_cfg.get("image"),
        classes=list(entry["classes"]),
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (parallel jobs fetching into one cache wait for each other)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch(spec: DatasetSpec, split: str, cache: Path, download: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """Make every file of ``split`` present and verified in ``cache``; {file name: (path, sha256)}."""
    from pruneshot.data.downloads import DownloadError, fetch

    base = download["mirrors"].get(spec.name) or spec.base_url
    assert base is not None
    base = base if base.endswith("/") else base + "/"
    overrides = download["checksums"].get(spec.name, {})
    out: dict[str, tuple[Path, str]] = {}
    with _file_lock(cache / ".lock"):
        for f in spec.files_for(split):
            sha = overrides.get(f.name, f.sha256).lower()
            try:
                path = fetch(base + f.name, cache / f.name, sha, attempts=int(download["attempts"]),
                             timeout_s=float(download["timeout_s"]), min_rate_bps=float(download["min_rate_bps"]))
            except DownloadError as e:
                raise DatasetError(f"dataset {spec.name!r} (split {split!r}): cannot download {f.name}: {e}") from e
            out[f.name] = (path, sha)
    return out


def _read(spec: DatasetSpec, split: str, paths: dict[str, tuple[Path, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse the downloaded files of ``split`` with the readers of :mod:`pruneshot.data.formats`."""
    from pruneshot.data import formats

    parts = ("train", "test") if split == "all" else (split,)

    def path(part: str, i: int) -> Path:
        return paths[spec.files[part][i].name][0]

    if spec.name in ("mnist", "fashion_mnist"):
        pieces = [formats.read_idx_gz(path(p, 0), path(p, 1)) for p in parts]
    elif spec.name in ("cifar10", "cifar100"):
        members_of, label_bytes = (CIFAR10_MEMBERS, 1) if spec.name == "cifar10" else (CIFAR100_MEMBERS, 2)
        members = [m for p in parts for m in members_of[p]]
        pieces = [formats.read_cifar_binary_tar(path(parts[0], 0), members, label_bytes)]
    elif spec.name == "svhn":
        pieces = [formats.read_svhn_mat(path(p, 0)) for p in parts]
    else:  # pragma: no cover - the registry and this dispatch are kept in step by the tests
        raise ValueError(f"no reader for dataset {spec.name!r}")
    return torch.cat([x for x, _ in pieces]), torch.cat([y for _, y in pieces])


def _load_image_folder(root: Path | str | None, image: dict[str, Any], classes: list[int] | None) -> RawDataset:
    """Read the selected class folders of an image folder at ``image["size"]`` (see :func:`load_raw`)."""
    from pruneshot.data import formats

    if root is None:
        raise DatasetError("dataset 'imagefolder': no root directory given (config key 'root')")
    if not image.get("size"):
        raise DatasetError("dataset 'imagefolder': data.image.size must be set (images are resized to it)")
    root = Path(root)
    channels = image.get("channels") or 3
    try:
        names = formats.image_folder_classes(root)
        listing = formats.image_folder_files(root, classes)
        x, y = formats.read_image_folder(root, int(image["size"]), channels, classes)
    except ValueError as e:
        raise DatasetError(f"dataset 'imagefolder' (root {root}): {e}") from e
    h = hashlib.sha256()
    for label, fp in listing:
        h.update(f"{names[label]}/{fp.name}\t{sha256_file(fp)}\n".encode())
    files = ({"file": str(root), "n_images": len(listing), "sha256": h.hexdigest(),
              "digest_of": "lines '<class>/<file>\\t<sha256 of the file>\\n' in read order"},)
    return RawDataset(x=x.numpy(), y=y.numpy(), max_value=255, name="imagefolder", split="all", files=files,
                      class_names=tuple(names))


def reconcile(x: np.ndarray, max_value: int, channels: int | None = None, size: int | None = None,
              chunk: int = 2048) -> np.ndarray:
    """Convert uint8 images (N, C, H, W) to ``channels`` and ``size`` x ``size`` (None: keep).

    Gray -> RGB replicates the channel; RGB -> gray is ITU-R 601 luma (``LUMA_WEIGHTS``); resizing
    is torch bilinear interpolation with antialias (align_corners False). All steps run in float32
    and are rounded (half to even) once at the end, clamped to [0, max_value]. Returns ``x`` itself
    when nothing changes.
    """
    n, c, h, w = x.shape
    tc = channels or c
    th, tw = (size, size) if size else (h, w)
    if (tc, th, tw) == (c, h, w):
        return x
    if c not in (1, 3) or tc not in (1, 3):
        raise ValueError(f"cannot convert {c} channels to {tc}; only 1 (gray) and 3 (RGB) are supported")
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
    out = np.empty((n, tc, th, tw), dtype=np.uint8)
    for i in range(0, n, chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).to(torch.float32)
        if c == 3 and tc == 1:
            t = (t * weights).sum(dim=1, keepdim=True)
        if (th, tw) != (h, w):
            t = torch.nn.functional.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False,
                                                antialias=True)
        if c == 1 and tc == 3:
            t = t.expand(-1, 3, -1, -1)
        out[i:i + chunk] = t.round().clamp_(0, max_value).to(torch.uint8).numpy()
    return out


def _select(raw: RawDataset, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(np.isin(raw.y, classes))
    y = raw.y[idx]
    empty = [c for c in classes if not (y == c).any()]
    if empty:
        raise DatasetError(f"dataset {raw.name!r} (split {raw.split!r}): classes {empty} have no images")
    return raw.x[idx], y


def _relabel(y: np.ndarray, classes: list[int]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[int(v)] for v in y], dtype=np.int64)


def _save_split(path: Path, x: np.ndarray, y: np.ndarray, classes: list[int]) -> dict[str, Any]:
    save_tensors(
        path,
        {"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(_relabel(y, classes)),
         "orig_y": torch.from_numpy(y.copy())},
    )
    return {"file": path.name, "n": len(y), "sha256": sha256_file(path)}


@contextlib.contextmanager
def _staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it replaces ``out_dir`` as a whole.

    On failure the temporary directory is removed and ``out_dir`` is left as it was (Snakemake
    removes a job's old outputs before running it, so nothing prepared is left behind).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = out_dir.parent / f".{out_dir.name}.{tag}.tmp"
    tmp.mkdir()  # mode from the umask, as a directory made by Snakemake would have
    try:
        yield tmp
        if out_dir.exists() and any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.{tag}.old"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)  # rename(2) may replace an empty directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _common_manifest(raw: RawDataset, role: str, classes: list[int], x: np.ndarray, native: tuple[int, ...],
                     image: dict[str, Any] | None) -> dict[str, Any]:
    image = image or {}
    names = raw.class_names
    conversion: dict[str, Any] = {"channels": image.get("channels"), "size": image.get("size")}
    if raw.name == "imagefolder":
        conversion["applied_by"] = "PIL at read time (convert to L/RGB, bilinear resize)"
    return {
        "dataset": raw.name,
        "split": raw.split,
        "role": role,
        "classes": classes,
        "class_names": [names[c] for c in classes] if names is not None else None,
        "image_shape": list(x.shape[1:]),
        "native_shape": list(native),
        "conversion": conversion,
        "max_value": raw.max_value,
        "source_files": list(raw.files),
    }


def prepare_source(raw: RawDataset, classes: list[int], val_fraction: float, seed: int, out_dir: Path,
                   image: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> dict:
    """Write train/val shards of the source classes (stratified hold-out) and manifest.json.

    ``image`` is the config's ``data.image`` (``channels``, ``size``; None keeps the native
    shape), applied with :func:`reconcile`; ``provenance`` (the job's, if given) is stored in the
    manifest. Everything is written to a temporary sibling of ``out_dir`` that replaces it at the
    end, so a failure leaves no partial output.
    """
    x, y = _select(raw, classes)
    native = x.shape[1:]
    x = reconcile(x, raw.max_value, (image or {}).get("channels"), (image or {}).get("size"))
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, round(val_fraction * len(idx)))].tolist())
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[val_idx] = True
    with _staged_dir(out_dir) as tmp:
        train = _save_split(tmp / "train.safetensors", x[~val_mask], y[~val_mask], classes)
        val = _save_split(tmp / "val.safetensors", x[val_mask], y[val_mask], classes)
        scaled = x[~val_mask].astype(np.float64) / raw.max_value
        manifest = {
            **_common_manifest(raw, "source", classes, x, native, image),
            "normalization": {"mean": float(scaled.mean()), "std": float(scaled.std())},
            "val_fraction": val_fraction,
            "split_seed": seed,
            "splits": {"train": train, "val": val},
        }
        if provenance is not None:
            manifest["provenance"] = provenance
        write_json(tmp / "manifest.json", manifest)
    return manifest


def prepare_target(raw: RawDataset, classes: list[int], out_dir: Path,
                   image: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> dict:
    """Write the target pool shard (all images of the target classes) and manifest.json.

    ``image`` and the atomic write are as in :func:`prepare_source`.
    """
    x, y = _select(raw, classes)
    native = x.shape[1:]
    x = reconcile(x, raw.max_value, (image or {}).get("channels"), (image or {}).get("size"))
    with _staged_dir(out_dir) as tmp:
        pool = _save_split(tmp / "pool.safetensors", x, y, classes)
        manifest = {
            **_common_manifest(raw, "target", classes, x, native, image),
            "class_counts": {str(c): int((y == c).sum()) for c in classes},
            "splits": {"pool": pool},
        }
        if provenance is not None:
            manifest["provenance"] = provenance
        write_json(tmp / "manifest.json", manifest)
    return manifest
