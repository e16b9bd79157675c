"""Resumable long jobs: atomic, never-pickled training checkpoints.

A job's checkpoint is one directory (for pipeline jobs ``results/<study>/checkpoints/<the job's
output directory below results/<study>/>``, e.g. ``results/mnist10k_default/checkpoints/pretrain/r0/``;
not a Snakemake or DVC output) holding two files:

* ``state-<n>.safetensors``: every tensor -- model weights and BatchNorm buffers, optimiser state
  (SGD momentum buffers, Adam moments and step counts, per parameter index), ``torch.Generator``
  states (uint8), the global torch CPU RNG state, best-so-far weights;
* ``checkpoint.json``, the manifest: format, settings key, the tensor file's name and sha256, and
  the JSON state (epoch, history, best epoch and validation accuracy, optimiser param groups,
  scheduler position, the Python and NumPy global RNG states).

Each file is written to a temporary name, flushed to disk (fsync) and renamed over its final
name; the manifest is renamed only after the tensor file it names is in place, and the previous
tensor file is deleted only after that. A reader therefore sees the previous checkpoint or the new
one, never a mix, and a tensor file whose sha256 differs from the manifest's is never used.

A checkpoint carries a *settings key*: a hash of everything that determines the job's result (the
config settings the job reads, its inputs' sha256, the source of the modules that compute it, the
torch version, the device) and, via :meth:`Checkpointer.scoped`, the training loop's own
arguments. A checkpoint with another key, another format, a missing or corrupt tensor file or an
unreadable manifest is logged, removed and ignored: the job starts from scratch, never resumes
from it. The stage deletes the checkpoint once its outputs are written.

Floats in the JSON state are written with ``repr`` precision, so they read back bit for bit; with
the tensors restored exactly, a resumed CPU run continues with the very same arithmetic as an
uninterrupted one and ends with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruneshot.io import create_temp
from pruneshot.paths import RESULTS, RESULTS_DIR

FORMAT = "pruneshot-checkpoint/1"
MANIFEST = "checkpoint.json"
_TENSORS_PREFIX = "state-"
_TMP_PREFIX = ".tmp-"


def settings_key(*parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``: what a checkpoint must match to be resumed."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_sha256(*modules: str) -> str:
    """sha256 over the source files of the named modules (e.g. ``pruneshot.training``): a checkpoint
    written by other code than the code now running is not resumed."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        h.update(f"{name}\0".encode())
        if origin and os.path.isfile(origin):
            h.update(Path(origin).read_bytes())
    return h.hexdigest()


def sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` named ``<prefix>.<key>``, as ``{key: tensor}``."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{<prefix>.<key>: tensor}``: a state dict under one name in a checkpoint."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def optimizer_state(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A ``torch.optim`` optimiser's state as (tensors named ``<prefix>.<param index>.<key>``, JSON
    part: param groups (lr, momentum, ...) and any non-tensor per-parameter values)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   prefix: str) -> None:
    """Restore what :func:`optimizer_state` saved into ``opt`` (built on the same parameters)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in sub(tensors, prefix).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["plain"].items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNGs: torch's CPU generator (uint8 tensor), Python's ``random`` and NumPy's legacy
    global generator (JSON)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [version, list(internal), gauss],
             "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]})


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors (on the CPU) and JSON state."""

    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    rng: dict[str, Any]
    directory: Path

    def restore_rng(self) -> None:
        """Set the global torch/Python/NumPy RNGs to their state when the checkpoint was saved."""
        set_rng_state(self.tensors, self.rng)


def checkpoint_location(out_dir: Path | str) -> tuple[Path, Path]:
    """(checkpoint directory, cleanup root) for a job writing into ``out_dir``.

    Below a study root ``results/<study>/`` (the nearest ``results``): ``results/<study>/checkpoints/
    <the rest>`` (:data:`pruneshot.paths.RESULTS` ``["checkpoints"]``), e.g.
    ``results/mnist10k_default/search/dap/b0.5/r0`` -> ``results/mnist10k_default/checkpoints/search/dap/b0.5/r0``,
    root ``results/<study>``. Elsewhere (stages called directly): ``<parent>/.checkpoints/<name>``,
    root ``<parent>``. Emptied directories are removed up to (not including) the root."""
    out_dir = Path(out_dir)
    parts = out_dir.parts
    if RESULTS_DIR in parts[:-2]:  # results/<study>/<at least one more part>
        i = len(parts) - 3 - parts[-3::-1].index(RESULTS_DIR)
        root = Path(*parts[: i + 2])
        return root.joinpath(RESULTS["checkpoints"], *parts[i + 2 :]), root
    return out_dir.parent / ".checkpoints" / out_dir.name, out_dir.parent


class Checkpointer:
    """Saves and loads one job's checkpoint in ``directory`` (see the module docstring).

    ``key``: the settings key the checkpoint must carry to be resumed. ``log``: where "resumed",
    "ignored" and "removed" are reported. ``root``: :meth:`clear` removes emptied parent
    directories up to (not including) it."""

    def __init__(self, directory: Path | str, key: str, *, log: Callable[[str], None] = print,
                 root: Path | str | None = None) -> None:
        self.directory = Path(directory)
        self.key = key
        self.log = log
        self.root = Path(root) if root is not None else None

    @classmethod
    def for_outputs(cls, out_dir: Path | str, key: str, *, log: Callable[[str], None] = print) -> Checkpointer:
        """The checkpointer of the job writing into ``out_dir`` (:func:`checkpoint_location`)."""
        directory, root = checkpoint_location(out_dir)
        return cls(directory, key, log=log, root=root)

    def scoped(self, *parts: Any) -> Checkpointer:
        """The same directory with a key that also covers ``parts`` (a training loop's arguments)."""
        return Checkpointer(self.directory, settings_key(self.key, *parts), log=self.log, root=self.root)

    # --- reading ---------------------------------------------------------------------------------

    def load(self) -> Checkpoint | None:
        """The checkpoint if there is a complete one with this key; otherwise None, after removing
        whatever is in the directory (a stale, foreign or half-written checkpoint)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            if self.directory.exists():
                self.log(f"checkpoint {self.directory}: no manifest (interrupted before the first save); removed")
                self.clear()
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            if manifest.get("settings") != self.key:
                raise ValueError("its settings key differs from this job's (other config, inputs, code or arguments)")
            if not str(manifest["tensors"]).startswith(_TENSORS_PREFIX) or "/" in manifest["tensors"]:
                raise ValueError(f"tensor file name {manifest['tensors']!r} is not one this module writes")
            data = (self.directory / manifest["tensors"]).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != manifest["sha256"]:
                raise ValueError(f"{manifest['tensors']} has sha256 {digest}, the manifest says {manifest['sha256']}")
            tensors = load(data)
            state, rng = manifest["state"], manifest["rng"]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            self.log(f"checkpoint {self.directory} ignored and removed: {exc}")
            self.clear()
            return None
        return Checkpoint(tensors=tensors, state=state, rng=rng, directory=self.directory)

    # --- writing ---------------------------------------------------------------------------------

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write a new checkpoint atomically: ``tensors`` (any device; copied to the CPU) plus the
        global RNG states, and the JSON-serialisable ``state``; then drop the previous one."""
        from safetensors.torch import save

        rng_tensors, rng = rng_state()
        clash = set(tensors) & set(rng_tensors)
        if clash:
            raise ValueError(f"checkpoint tensor names {sorted(clash)} are reserved")
        # Copies: safetensors refuses tensors that share memory (e.g. a best state aliasing the model).
        blob = save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in {**tensors, **rng_tensors}.items()},
                    metadata={"format": FORMAT})
        self._makedirs()
        seq = 1 + max((int(p.name[len(_TENSORS_PREFIX):].split(".")[0]) for p in self._tensor_files()), default=0)
        name = f"{_TENSORS_PREFIX}{seq:06d}.safetensors"
        self._write(self.directory / name, blob)
        manifest = {"format": FORMAT, "settings": self.key, "tensors": name,
                    "sha256": hashlib.sha256(blob).hexdigest(), "saved_unix": time.time(), "state": state, "rng": rng}
        self._write(self.directory / MANIFEST, json.dumps(manifest).encode())
        self._fsync_dir()
        for p in [*self._tensor_files(), *self.directory.glob(f"{_TMP_PREFIX}*")]:
            if p.name != name:
                p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the checkpoint directory, and emptied parents up to the root."""
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.root is None:
            return
        parent = self.directory.parent
        root = self.root.resolve()
        while parent.resolve() != root and root in parent.resolve().parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (another job's checkpoint) or already gone
                break
            parent = parent.parent

    def exists(self) -> bool:
        return (self.directory / MANIFEST).is_file()

    def _tensor_files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{_TENSORS_PREFIX}*.safetensors"))

    def _makedirs(self) -> None:
        for attempt in range(5):  # a concurrent clear() may remove an emptied parent between two mkdirs
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                return
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = create_temp(self.directory, _TMP_PREFIX)  # the umask's mode, not mkstemp's 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
