"""Shared end-to-end fixture: the real workflow (DVC -> Snakemake -> MLflow) on the tiny config in a
temporary copy of this working tree, run once per test session and shared by the test modules that
need a finished study (test_pipeline, test_audit). Tests that modify files must work on a copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ROOT / "tests/configs/tiny.yaml"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PRUNESHOT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "pruneshot test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@pruneshot.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "pruneshot test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@pruneshot.invalid")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_worktree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of this checkout (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with the tiny config as default, after one `dvc repro`."""
    base = tmp_path_factory.mktemp("e2e")
    proj = base / "proj"
    copy_worktree(proj)
    shutil.copy(TINY, proj / "config/config.yaml")
    run(["git", "init", "-q", "-b", "main"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "tiny study"], proj)
    run([str(BIN / "dvc"), "repro", "pipeline"], proj)
    return proj


