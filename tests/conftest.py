"""Shared end-to-end fixture: the real workflow (DVC -> Snakemake -> MLflow) on the tiny config in a
temporary copy of this working tree, run once per test session and shared by the test modules that
need a finished study (test_pipeline, test_audit). Tests that modify files must work on a copy.
Also a real `mlflow server` (:class:`MlflowServer`, fixture ``mlflow_server``) for the tracking tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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


def study_dir(proj: Path, kind: str = "results") -> Path:
    """``results/<study.name>/`` (``kind="logs"``: ``logs/<study.name>/``) of the study that ``proj``'s
    config/config.yaml describes: every output of a study lies below it (pruneshot.paths)."""
    import yaml

    name = yaml.safe_load((proj / "config/config.yaml").read_text())["study"]["name"]
    return proj / kind / name


def copy_worktree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of this checkout (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module (tiny networks run fastest so, and the test machine's cores are
    shared with the Slurm tests running alongside); the previous count is restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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




def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` (SQLite backend store, local artifact destination) on 127.0.0.1, in its
    own process group so that :meth:`kill` takes down every worker; :meth:`start` after a kill brings
    it back on the same store and port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 90) -> str:
        """Start and wait for /health; returns the tracking URI."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no GenAI job runner: faster start
        self.starts += 1
        log_path = self.root / f"server-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server not healthy in {timeout_s} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (no shutdown code runs)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of a real `mlflow server` on a free local port; stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HTTP proxy for 127.0.0.1/localhost (servers the tests start themselves)."""
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
