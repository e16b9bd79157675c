"""What DVC recorded: every stage output of the project's ``dvc.yaml``/``dvc.lock`` (and ``.dvc`` files),
read through DVC's own API, as md5 claims per file.

``dvc.repo.Repo(root).index.stages`` loads each stage with its outputs, and an output's ``hash_info``
holds the md5 that ``dvc.lock`` recorded for it (``<md5>.dir`` for a directory). A directory's listing
is loaded with ``dvc_data.hashfile.load`` from the project's cache, or from a remote on this machine
(never over a network, never copied into the cache), and its files become claims by name. A listing is
used only if DVC's ``Tree.digest`` of it reproduces its name; without one, the directory is hashed as
DVC would (the files ``repo.dvcignore`` keeps, their md5 in a ``Tree``) and compared as a whole.
No hash DVC computed is trusted (no ``dvc status``, no state database): md5s of the workspace come
from the bytes on disk (:class:`~pruneshot.audit.records.Hasher`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruneshot.audit.records import Claim, Hasher


@dataclass
class DirOut:
    """A directory output: its path, recorded ``<md5>.dir``, who recorded it, its listing (relpath -> md5,
    None if no intact listing was found) and the files DVC would list in the workspace now."""

    path: str
    md5: str
    by: str
    listing: dict[str, str] | None
    workspace: list[str]


class DvcOutputs:
    """The outputs DVC recorded, as per-file md5 claims (directories through their ``.dir`` listing).

    ``present``: the project is a DVC repository whose lock records at least one output.
    ``error``: DVC could not read the project (a broken ``dvc.yaml``/``dvc.lock``)."""

    def __init__(self, root: Path, hasher: Hasher) -> None:
        self.root, self.hasher = root, hasher
        self.files: dict[str, Claim] = {}  # path -> claim (file outputs, and the files of directory listings)
        self.dirs: list[DirOut] = []
        self.notes: list[str] = []
        self.error: str | None = None
        self.present = False
        if not (root / ".dvc").is_dir():
            self.notes.append("not a DVC project (no .dvc/): only the hashes in records were compared")
            return
        try:
            self._load()
        except Exception as err:  # DVC's own errors (a broken dvc.yaml/dvc.lock) are many classes
            self.error = f"DVC cannot read the project's stages: {type(err).__name__}: {err}"
        if self.error is None and not self.present:
            self.notes.append("no dvc.lock (no stage output has a recorded hash): only the hashes in records "
                              "were compared")

    def _load(self) -> None:
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            remotes = _local_remote_odbs(repo)
            root_dir = repo.root_dir
            for stage in repo.index.stages:
                lock = _lock_file(root_dir, stage)
                for out in stage.outs:
                    if not out.is_in_repo or not out.hash_info or not out.hash_info.value:
                        continue
                    self.present = True
                    path = Path(os.path.relpath(out.fs_path, root_dir)).as_posix()
                    md5 = str(out.hash_info.value)
                    name = getattr(stage, "name", None)  # a dvc.yaml stage; None for a .dvc file
                    by = f"{lock} (stage {name}, out {path})" if name else f"{lock} (out {path})"
                    if out.hash_info.name != "md5":
                        self.notes.append(f"{lock} out {path}: {out.hash_info.name} hash (DVC 2), not verified")
                        continue
                    if not out.is_dir_checksum:
                        self.files[path] = Claim(path, "md5", md5, by)
                        continue
                    listing = self._listing(out, [out.cache, *remotes])
                    workspace = sorted(Path(os.path.relpath(p, out.fs_path)).as_posix()
                                       for p in repo.dvcignore.find(repo.fs, out.fs_path))
                    self.dirs.append(DirOut(path, md5, by, listing, workspace))
                    for relpath, file_md5 in (listing or {}).items():
                        rel = f"{path}/{relpath}"
                        self.files[rel] = Claim(rel, "md5", file_md5, f"{by}, {md5} listing")

    def _listing(self, out: Any, odbs: list[Any]) -> dict[str, str] | None:
        """relpath -> md5 of the ``.dir`` object ``out`` records, from the first store holding it intact."""
        from dvc_data.hashfile import load
        from dvc_data.hashfile.tree import Tree

        for odb in odbs:
            try:
                tree = load(odb, out.hash_info)
            except Exception:  # not in this store (FileNotFoundError) or not a listing (ObjectFormatError)
                continue
            assert isinstance(tree, Tree)
            copy = Tree.from_list(tree.as_list())
            copy.digest()
            if copy.hash_info.value != out.hash_info.value:
                self.notes.append(f"{tree.path}: corrupt .dir listing (its md5 differs from its name), not used")
                continue
            return {"/".join(key): hi.value for key, _, hi in tree if hi is not None}
        return None

    def claims_for(self, rel: str) -> list[Claim]:
        """dvc.lock's md5 of the file ``rel`` (none if DVC recorded none)."""
        c = self.files.get(rel)
        return [c] if c else []

    def workspace_dir_md5(self, d: DirOut) -> str:
        """DVC's ``<md5>.dir`` of the directory ``d`` as it is now (file md5s from the bytes on disk)."""
        return dir_md5({rel: self.hasher.get(f"{d.path}/{rel}", "md5") or "" for rel in d.workspace})


def dir_md5(listing: dict[str, str]) -> str:
    """DVC's hash of a directory listing (relpath -> md5), by DVC's own ``Tree.digest``."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for relpath, md5 in listing.items():
        tree.add(tuple(relpath.split("/")), None, HashInfo("md5", md5))
    tree.digest()
    return str(tree.hash_info.value)


def _lock_file(root_dir: str, stage: Any) -> str:
    """Where DVC keeps ``stage``'s hashes: the ``dvc.lock`` beside its ``dvc.yaml``, or its ``.dvc`` file."""
    path = Path(os.path.relpath(stage.dvcfile.path, root_dir))
    return (path if path.suffix == ".dvc" else path.with_name("dvc.lock")).as_posix()


def _local_remote_odbs(repo: Any) -> list[Any]:
    """The object stores of the project's remotes that are directories on this machine."""
    out = []
    for name in repo.config.get("remote", {}):
        try:
            odb = repo.cloud.get_remote_odb(name, hash_name="md5")
        except Exception:  # a remote DVC cannot open here (missing plugin, bad config): skipped
            continue
        protocol = getattr(odb.fs, "protocol", ())
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        if protocols & {"local", "file"}:
            out.append(odb)
    return out
