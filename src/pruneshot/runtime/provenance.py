"""Provenance block carried by every metrics JSON: where a number came from."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "snakemake", "mlflow", "dvc", "numpy", "pandas", "pruneshot")


def git_state(cwd: Path | str | None = None) -> tuple[str, bool]:
    """(commit sha, dirty flag) of the repository at ``cwd``; ('unknown', True) outside git.

    The Snakefile exports PRUNESHOT_GIT_COMMIT/PRUNESHOT_GIT_DIRTY so every job
    of one run reports the state the run started from. ``dvc.lock`` is not counted as a
    change: it records outputs, and every ``dvc repro`` rewrites it.
    """
    env_commit = os.environ.get("PRUNESHOT_GIT_COMMIT")
    if env_commit:
        return env_commit, os.environ.get("PRUNESHOT_GIT_DIRTY", "1") == "1"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def process_age_s() -> float | None:
    """Seconds since this process started (for per-job overhead), None if unknown."""
    import time

    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:
        return None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform's processor or machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu") -> str:
    """Human-readable name of the compute device: 'cpu:<model>' or 'cuda:<GPU name>'."""
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu:{cpu_model()}"


def provenance(
    *,
    rule: str,
    wildcards: dict[str, Any],
    config_sha256: str,
    input_sha256: dict[str, str],
    seeds: dict[str, int],
    device: str = "cpu",
) -> dict[str, Any]:
    """The provenance block: git state, config hash, rule, wildcards, seeds, input sha256 (path -> hex),
    package versions, host, device."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "config_sha256": config_sha256,
        "rule": rule,
        "wildcards": {k: str(v) for k, v in wildcards.items()},
        "seeds": seeds,
        "inputs": dict(input_sha256),
        "packages": package_versions(),
        "host": socket.gethostname(),
        "device": device_name(device),
    }
