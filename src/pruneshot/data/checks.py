"""The data section's checks against what is on disk and in the dataset registry, run with the config
checks before any job starts (:func:`pruneshot.config.semantic_problems`): splits, class availability,
episode sizes per class, input shapes, image folders (listed, one image per class opened), download
mirrors and checksum overrides. Each problem is one sentence naming its config key."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

# Number of images per class in scikit-learn's digits (the smallest class has 174).
DATASET_CLASS_SIZES: dict[str, dict[int, int]] = {
    "digits": {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180},
    # the embedded files (sha256-pinned in pruneshot.data.mnist10k); tests/test_config.py recounts them
    "mnist10k": {0: 1001, 1: 1127, 2: 991, 3: 1032, 4: 980, 5: 863, 6: 1014, 7: 1070, 8: 944, 9: 978},
}


def data_problems(config: dict[str, Any]) -> list[str]:
    """Every problem of ``config['data']`` (with the episode sizes it must hold), in config order."""
    folder_sizes: dict[str, dict[int, int]] = {}
    problems: list[str] = _entry_problems(config, folder_sizes)
    src = config["data"]["source"]
    missing = _missing_classes(src["dataset"], src["classes"])
    if missing is not None:
        problems.append(
            f"config key 'data.source.classes': classes {missing[0]} do not exist in "
            f"{src['dataset']}; allowed: {missing[1]}"
        )
    ways = config["episodes"]["ways"]
    max_shots = max(config["episodes"]["shots"])
    for name, tgt in config["data"]["targets"].items():
        key = f"data.targets.{name}"
        missing = _missing_classes(tgt["dataset"], tgt["classes"])
        if missing is not None:
            problems.append(
                f"config key '{key}.classes': classes {missing[0]} do not exist in "
                f"{tgt['dataset']}; allowed: {missing[1]}"
            )
            continue
        sizes = DATASET_CLASS_SIZES.get(tgt["dataset"]) or folder_sizes.get(key)
        if sizes is not None:
            smallest = min(sizes[c] for c in tgt["classes"])
            if max_shots + 1 > smallest:
                problems.append(
                    f"config key 'episodes.shots': {max_shots} shots leave no query image in "
                    f"the smallest class of target '{name}' ({smallest} images); "
                    f"allowed: shots <= {smallest - 1}"
                )
        if len(tgt["classes"]) < ways:
            problems.append(
                f"config key 'episodes.ways': {ways}-way episodes need at least {ways} classes, "
                f"target '{name}' has {len(tgt['classes'])}"
            )
        same_root = tgt["dataset"] != "imagefolder" or _same_path(tgt.get("root"), src.get("root"))
        if tgt["dataset"] == src["dataset"] and same_root:
            shared = sorted(set(tgt["classes"]) & set(src["classes"]))
            if shared:
                problems.append(
                    f"config key '{key}.classes': classes {shared} are also source classes; "
                    "source and target must not share a class within one dataset"
                )
    return problems


def selection_data_problems(data: dict[str, Any]) -> list[str]:
    """transfer.select.data: its classes exist (an image folder is checked like a target's)."""
    if data["dataset"] == "imagefolder":
        found, _ = _image_folder_problems("transfer.select.data", data.get("root") or "", data["classes"])
        return found
    missing = _missing_classes(data["dataset"], data["classes"])
    if missing is not None:
        return [f"config key 'transfer.select.data.classes': classes {missing[0]} do not exist in "
                f"{data['dataset']}; allowed: {missing[1]}"]
    return []


def _missing_classes(dataset: str, classes: list[int]) -> tuple[list[int], str] | None:
    """(classes absent from ``dataset``, text of the allowed ones), or None when all exist or it is unknown."""
    from pruneshot.data.registry import REGISTRY

    sizes = DATASET_CLASS_SIZES.get(dataset)
    if sizes is not None:
        allowed, text = set(sizes), str(sorted(sizes))
    elif REGISTRY[dataset].num_classes is not None:
        n = REGISTRY[dataset].num_classes
        allowed, text = set(range(n)), f"0..{n - 1}"
    else:  # imagefolder: checked against its class folders by _image_folder_problems
        return None
    missing = [c for c in classes if c not in allowed]
    return (missing, text) if missing else None


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _entry_problems(config: dict[str, Any], folder_sizes: dict[str, dict[int, int]] | None = None) -> list[str]:
    """Splits, imagefolder settings and roots, input-shape agreement, mirrors and checksum overrides of the data
    section. The images per class of each imagefolder entry whose classes all have images go to
    ``folder_sizes[key]`` (key: ``data.source`` or ``data.targets.<name>``)."""
    from pruneshot.data.registry import REGISTRY, effective_shape

    data = config["data"]
    image = data.get("image") or {}
    entries = [("data.source", data["source"])] + [(f"data.targets.{n}", t) for n, t in data["targets"].items()]
    problems: list[str] = []
    for key, entry in entries:
        name = entry["dataset"]
        spec = REGISTRY[name]
        split = entry.get("split")
        if split is not None and split not in spec.splits:
            problems.append(
                f"config key '{key}.split': dataset {name} has no split {split!r}; "
                f"allowed: {', '.join(spec.splits)} (or null)"
            )
        if name == "imagefolder":
            if not entry.get("root"):
                problems.append(f"config key '{key}.root': dataset imagefolder needs root, the directory of "
                                "class folders")
            else:
                folder_problems, sizes = _image_folder_problems(key, entry["root"], entry["classes"])
                problems += folder_problems
                if sizes is not None and folder_sizes is not None:
                    folder_sizes[key] = sizes
            if not image.get("size"):
                problems.append(f"config key 'data.image.size': dataset imagefolder ({key}) needs data.image.size, "
                                "the side its images are resized to")
        elif entry.get("root") is not None:
            problems.append(f"config key '{key}.root': only imagefolder reads a root directory, not {name}; "
                            "remove it")
    src = data["source"]
    src_shape = effective_shape(src["dataset"], image)
    for name, tgt in data["targets"].items():
        tgt_shape = effective_shape(tgt["dataset"], image)
        if src_shape is not None and tgt_shape is not None and src_shape != tgt_shape:
            problems.append(
                f"config key 'data.image': target '{name}' ({tgt['dataset']}, images {list(tgt_shape)}) and the "
                f"source ({src['dataset']}, images {list(src_shape)}) differ in input shape [C, H, W]; set "
                "data.image.channels (1 or 3) and/or data.image.size to reconcile them"
            )
    for dataset, url in (data.get("download") or {}).get("mirrors", {}).items():
        problem = _mirror_problem(url)
        if problem:
            problems.append(f"config key 'data.download.mirrors.{dataset}': {url!r} {problem}")
    for dataset, files in (data.get("download") or {}).get("checksums", {}).items():
        known = [f.name for f in REGISTRY[dataset].all_files()]
        unknown = sorted(set(files) - set(known))
        if unknown:
            problems.append(
                f"config key 'data.download.checksums.{dataset}': unknown file(s) {unknown}; "
                f"allowed: {', '.join(known)}"
            )
    return problems


# First bytes of the formats PIL reads from a file named .png/.jpg/.jpeg/.bmp (it goes by content, not name).
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
_FOLDER_FORM = "allowed: a directory of class folders, root/<class>/<image>"


def _image_folder_problems(key: str, root: str, classes: list[int]) -> tuple[list[str], dict[int, int] | None]:
    """What keeps the job from reading ``classes`` of the image folder ``root`` (the path the job opens: a relative
    root is relative to the working directory, where Snakemake parses the Snakefile and runs every job), and the
    image files per class (None unless every class has some). Lists the folders; opens one image per class."""
    from pruneshot.data.folders import IMAGE_EXTENSIONS, class_folder_names, class_images

    path = Path(root)
    where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()}" + (
        "; '~' is not expanded)" if root.startswith("~") else ")")
    head = f"config key '{key}.root': {root!r}{where}"
    if not path.exists():
        return [f"{head} does not exist; {_FOLDER_FORM}"], None
    if not path.is_dir():
        return [f"{head} is not a directory; {_FOLDER_FORM}"], None
    try:
        names = class_folder_names(path)
    except OSError as e:
        return [f"{head} cannot be listed ({e.strerror}); {_FOLDER_FORM}"], None
    if not names:
        return [f"{head} has no class folders (sub-folders); {_FOLDER_FORM}"], None
    beyond = sorted({c for c in classes if not 0 <= c < len(names)})
    if beyond:
        shown = ", ".join(f"{i} {n!r}" for i, n in enumerate(names[:20])) + (", ..." if len(names) > 20 else "")
        return [f"config key '{key}.classes': classes {beyond} do not exist in imagefolder root {root!r}{where}: it "
                f"has {len(names)} class folders ({shown}); allowed: 0..{len(names) - 1} (indices into the sorted "
                "folder names)"], None
    problems, sizes = [], {}
    for c in sorted(set(classes)):
        folder = f"class folder {names[c]!r} (class {c})"
        try:
            images = class_images(path / names[c])
        except OSError as e:
            problems.append(f"{head}: {folder} cannot be listed ({e.strerror})")
            continue
        if not images:
            problems.append(f"{head}: {folder} holds no image file; allowed: files ending "
                            f"{', '.join(IMAGE_EXTENSIONS)} (any case)")
            continue
        unreadable = _image_file_problem(images[0])
        if unreadable:
            problems.append(f"{head}: {folder}: image {images[0].name!r} {unreadable}")
        sizes[c] = len(images)
    return problems, (None if problems else sizes)


def _image_file_problem(path: Path) -> str | None:
    """Why the image file ``path`` cannot be read (its first bytes only), or None."""
    try:
        with open(path, "rb") as f:
            first = f.read(16)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not first:
        return "is empty (0 bytes)"
    if not (first.startswith(_IMAGE_SIGNATURES) or (first[:4] == b"RIFF" and first[8:12] == b"WEBP")):
        return f"is not an image file (no PNG, JPEG, BMP, GIF, TIFF or WebP signature; its first bytes: {first!r})"
    return None


def _mirror_problem(url: str) -> str | None:
    """Why ``url`` cannot serve as a download base URL (the schema already asked for http, https or file), or
    None: http(s) needs a host, file:// an existing, readable local directory."""
    allowed = "allowed: http://host/path/, https://host/path/ or file:///local/directory/"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        return f"is not a valid URL ({e}); {allowed}"
    if parts.scheme in ("http", "https"):
        return None if parts.hostname else f"has no host; {allowed}"
    if parts.netloc not in ("", "localhost"):
        return (f"names the host {parts.netloc!r}; allowed: a directory on this machine, file:///path/ or "
                "file://localhost/path/")
    directory = urllib.parse.unquote(parts.path)
    if not directory:
        return f"names no directory; {allowed}"
    if not os.path.isdir(directory):
        state = "is not a directory" if os.path.exists(directory) else "does not exist"
        return f"is not an existing directory ({directory} {state}); {allowed}"
    if not os.access(directory, os.R_OK | os.X_OK):
        return f"names the directory {directory}, which cannot be read; {allowed}"
    return None
