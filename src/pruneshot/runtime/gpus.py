"""GPU leases for jobs sharing one node.

Snakemake's ``gpu`` resource (``--resources gpu=K``) only *counts* GPUs: it keeps at most K GPU
jobs running at once but never tells a job which device is free. :func:`lease_gpu` picks one
itself: every device of the node's pool has a lock file in a directory shared by all jobs on the
node, and a job holds a device while it holds an exclusive ``fcntl.flock`` on that file's open
descriptor. The kernel drops the lock when the descriptor is closed, also when the process exits,
crashes or is killed with SIGKILL, so a dead job never strands a device; the holder's pid is
written into the file for humans (``cat /tmp/pruneshot-gpu-locks-$UID/gpu0.lock``). The lease
sets ``CUDA_VISIBLE_DEVICES`` to the leased device(s), which only works before the process
initialises CUDA: take the lease at the start of a job, before any ``torch.cuda`` call.

The pool of devices is, in order of precedence: ``n_devices``; ``PRUNESHOT_FAKE_GPU_COUNT`` (a
testing hook: that many fake devices); the entries of an existing ``CUDA_VISIBLE_DEVICES`` (e.g.
the GPUs of a Slurm allocation); else every GPU NVML reports. :func:`uses_gpu` decides, from the same
pool and without torch, which jobs request a GPU (every job whose device setting will use CUDA here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

FAKE_COUNT_ENV = "PRUNESHOT_FAKE_GPU_COUNT"
LOCK_DIR_ENV = "PRUNESHOT_GPU_LOCK_DIR"
TIMEOUT_ENV = "PRUNESHOT_GPU_LEASE_TIMEOUT_S"
VISIBLE = "CUDA_VISIBLE_DEVICES"
#: How long a job waits for a free device by default: GPU jobs can queue behind long ones.
DEFAULT_TIMEOUT_S = 24 * 3600.0

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class GpuLeaseTimeoutError(TimeoutError):
    """No device became free within the timeout."""


def default_lock_dir() -> Path:
    """``$PRUNESHOT_GPU_LOCK_DIR``, else ``<tmp>/pruneshot-gpu-locks-<uid>``, one per node and user.

    Inside a Slurm job the directory is per job (``-slurm<SLURM_JOB_ID>``): Slurm may number each
    allocation's GPUs from 0, so two allocations on one node must not compare lock names.
    """
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    name = f"pruneshot-gpu-locks-{os.getuid()}"
    if os.environ.get("SLURM_JOB_ID"):
        name += f"-slurm{os.environ['SLURM_JOB_ID']}"
    return Path(tempfile.gettempdir()) / name


def _nvml_count() -> int | None:
    """GPUs NVML reports (without initialising CUDA in this process), or None without NVML."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        return int(count.value) if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else None
    finally:
        nvml.nvmlShutdown()


def _torch_count() -> int:
    """torch.cuda.device_count() in a child process: CUDA initialised here would ignore a later
    CUDA_VISIBLE_DEVICES."""
    code = "import torch; print(torch.cuda.device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def device_pool(n_devices: int | None = None, *, torch_fallback: bool = True) -> list[str]:
    """The device ids jobs on this node share (see the module docstring for the precedence).

    Without NVML the count comes from torch in a child process, unless ``torch_fallback`` is False
    (then none: a node without libnvidia-ml has no NVIDIA driver, so no usable GPU)."""
    if n_devices is not None:
        return [str(i) for i in range(n_devices)]
    fake = os.environ.get(FAKE_COUNT_ENV, "").strip()
    if fake:
        return [str(i) for i in range(int(fake))]
    visible = os.environ.get(VISIBLE)
    if visible is not None:
        pool = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry
                break
            pool.append(entry)
        return pool
    count = _nvml_count()
    if count is None:
        count = _torch_count() if torch_fallback else 0
    return [str(i) for i in range(count)]


#: Device settings of pretrain.device / transfer.device (config/schema.yaml).
DEVICE_SETTINGS = ("auto", "cpu", "cuda")


def node_has_gpu() -> bool:
    """Whether this node has a GPU for jobs, decided without torch and without initialising CUDA:
    :func:`device_pool` without its torch fallback is not empty."""
    return bool(device_pool(torch_fallback=False))


def uses_gpu(setting: str) -> bool:
    """Whether a job whose device setting is ``setting`` will use CUDA on this node: 'cuda' always,
    'auto' when the node has a GPU (:func:`node_has_gpu`), 'cpu' never. Cheap and torch-free, so the
    workflow decides every rule's ``gpu`` request with it while Snakemake parses (rules/common.smk)."""
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"unknown device setting {setting!r}; allowed: {', '.join(DEVICE_SETTINGS)}")
    return setting == "cuda" or (setting == "auto" and node_has_gpu())


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _lock_path(lock_dir: Path, device: str) -> Path:
    return lock_dir / f"gpu{_SAFE.sub('_', device)}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (pid written into it), or None if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={time.time():.3f}\n".encode(), 0)
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def holders(lock_dir: Path, pool: list[str]) -> dict[str, str]:
    """What each device's lock file says about its holder (``pid=... host=... since=...``)."""
    out = {}
    for device in pool:
        try:
            out[device] = _lock_path(lock_dir, device).read_text().strip() or "?"
        except OSError:
            out[device] = "?"
    return out


@contextlib.contextmanager
def lease_gpu(
    count: int = 1,
    *,
    lock_dir: Path | str | None = None,
    n_devices: int | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.1,
    max_poll_s: float = 2.0,
    log: Callable[[str], None] | None = None,
) -> Iterator[list[str]]:
    """Hold ``count`` free devices of the node's pool; yields their ids.

    Inside, ``CUDA_VISIBLE_DEVICES`` is the leased ids (restored on exit). ``count`` 0, or a node
    without GPUs, leases nothing and changes nothing (a job that needs CUDA then fails on its own
    device check); more than the pool holds is an error. When every device is held, waits (polling with jittered backoff
    from ``poll_s`` to ``max_poll_s``) up to ``timeout_s`` (default ``$PRUNESHOT_GPU_LEASE_TIMEOUT_S``
    or 24 h), then raises :class:`GpuLeaseTimeoutError` naming the lock directory and the holders.
    A job needing several devices takes all of them at once or none (no partial hold, no deadlock).
    """
    if count <= 0:
        yield []
        return
    if _cuda_initialised():
        raise RuntimeError("lease_gpu: CUDA is already initialised in this process, so CUDA_VISIBLE_DEVICES "
                           "would be ignored; take the lease before any torch.cuda call")
    pool = device_pool(n_devices)
    if not pool:  # nothing to share: the job runs as it would without a request (its device setting decides)
        if log is not None:
            log(f"{count} GPU(s) requested but no GPU found on this node; no lease taken")
        yield []
        return
    if count > len(pool):
        raise RuntimeError(f"lease_gpu: {count} GPU(s) requested but this node's pool has {len(pool)} ({pool})")
    directory = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    deadline = time.monotonic() + timeout_s
    # Start the scan at a pid-dependent device: jobs starting together rarely race for the same file.
    start = os.getpid() % len(pool)
    order = pool[start:] + pool[:start]
    delay = poll_s
    held: dict[str, int] = {}
    waited = False
    try:
        while True:
            for device in order:
                fd = _try_lock(_lock_path(directory, device))
                if fd is not None:
                    held[device] = fd
                    if len(held) == count:
                        break
            if len(held) == count:
                break
            for fd in held.values():  # all or nothing
                _unlock(fd)
            held.clear()
            if time.monotonic() >= deadline:
                taken = "; ".join(f"gpu {d}: {h}" for d, h in holders(directory, pool).items())
                raise GpuLeaseTimeoutError(f"lease_gpu: no {count} free GPU(s) of {len(pool)} after {timeout_s:g} s; "
                                      f"lock directory {directory}; holders: {taken}")
            if not waited and log is not None:
                log(f"all {len(pool)} GPU(s) in use; waiting for a free one (lock directory {directory})")
            waited = True
            time.sleep(min(delay * random.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, max_poll_s)
        leased = sorted(held, key=pool.index)
        previous = os.environ.get(VISIBLE)
        os.environ[VISIBLE] = ",".join(leased)
        if log is not None:
            log(f"leased GPU {','.join(leased)} of {len(pool)} (CUDA_VISIBLE_DEVICES={os.environ[VISIBLE]}, "
                f"lock directory {directory})")
        try:
            yield leased
        finally:
            if previous is None:
                os.environ.pop(VISIBLE, None)
            else:
                os.environ[VISIBLE] = previous
    finally:
        for fd in held.values():
            _unlock(fd)


def lease_for_job(resources: object, log: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager:
    """The lease a Snakemake job needs: ``resources.gpu`` devices (nothing when 0 or unset)."""
    get = getattr(resources, "get", None)
    count = int(get("gpu", 0) or 0) if callable(get) else 0
    return lease_gpu(count, log=log)
