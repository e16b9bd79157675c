"""GPU leases (pruneshot.runtime.gpus) with a faked device count: concurrent processes never share a device,
a killed holder frees its device, CUDA_VISIBLE_DEVICES is set inside and restored after."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from pruneshot.runtime import gpus
from pruneshot.runtime.gpus import GpuLeaseTimeoutError, device_pool, lease_for_job, lease_gpu, uses_gpu

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# One worker process: lease `count` devices, record (devices, CUDA_VISIBLE_DEVICES, t_start, t_end).
WORKER = """
import json, os, sys, time
from pruneshot.runtime.gpus import lease_gpu
lock_dir, out, count, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with lease_gpu(count, lock_dir=lock_dir, timeout_s=60, poll_s=0.02, max_poll_s=0.1) as devices:
    t0 = time.time()
    visible = os.environ["CUDA_VISIBLE_DEVICES"]
    time.sleep(hold)
    t1 = time.time()
line = json.dumps({"pid": os.getpid(), "devices": devices, "visible": visible, "t0": t0, "t1": t1,
                   "after": os.environ.get("CUDA_VISIBLE_DEVICES")})
with open(out, "a") as f:
    f.write(line + "\\n")
"""

# Leases one device, says so, then waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from pruneshot.runtime.gpus import lease_gpu
with lease_gpu(1, lock_dir=sys.argv[1], timeout_s=30) as devices:
    Path(sys.argv[2]).write_text(",".join(devices))
    time.sleep(600)
"""


def _env(fake: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (gpus.FAKE_COUNT_ENV, gpus.VISIBLE)}
    if fake is not None:
        env[gpus.FAKE_COUNT_ENV] = str(fake)
    return env


def _run_workers(tmp_path: Path, n: int, k: int, count: int, hold: float) -> list[dict]:
    out = tmp_path / "leases.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "locks"), str(out), str(count), str(hold)],
                              env=_env(k), stderr=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    return [json.loads(line) for line in out.read_text().splitlines()]


def _overlaps(a: dict, b: dict) -> bool:
    return a["t0"] < b["t1"] and b["t0"] < a["t1"]


@pytest.fixture
def no_gpu_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(gpus.FAKE_COUNT_ENV, raising=False)
    monkeypatch.delenv(gpus.VISIBLE, raising=False)
    monkeypatch.delenv(gpus.LOCK_DIR_ENV, raising=False)
    yield


def test_concurrent_jobs_never_share_a_device(tmp_path: Path) -> None:
    n, k = 7, 3
    leases = _run_workers(tmp_path, n, k, count=1, hold=0.4)
    assert len(leases) == n  # every job got a device
    assert {d for lease in leases for d in lease["devices"]} <= {str(i) for i in range(k)}
    for lease in leases:
        assert lease["visible"] == ",".join(lease["devices"])  # CUDA_VISIBLE_DEVICES = the leased device
        assert lease["after"] is None  # and unset again after the lease
    for i, a in enumerate(leases):
        for b in leases[i + 1:]:
            if set(a["devices"]) & set(b["devices"]):
                assert not _overlaps(a, b), (a, b)
    # the devices were used in parallel: at some moment k jobs held a device each
    peak = max(sum(_overlaps(a, b) for b in leases) for a in leases)
    assert peak >= 2


def test_multi_device_leases_are_disjoint(tmp_path: Path) -> None:
    leases = _run_workers(tmp_path, 4, 3, count=2, hold=0.3)
    assert len(leases) == 4
    for lease in leases:
        assert len(set(lease["devices"])) == 2 and lease["visible"] == ",".join(lease["devices"])
    for i, a in enumerate(leases):
        for b in leases[i + 1:]:
            assert not _overlaps(a, b), (a, b)  # 2 + 2 > 3: never two at once


def test_killed_holder_frees_its_device(tmp_path: Path) -> None:
    locks, ready = tmp_path / "locks", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(locks), str(ready)], env=_env(1))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None, "holder exited early"
            assert time.monotonic() < deadline, "holder never leased"
            time.sleep(0.05)
        assert ready.read_text() == "0"
        # while it lives, the only device is taken: a bounded wait fails and names the holder
        with pytest.raises(GpuLeaseTimeoutError) as err, lease_gpu(1, lock_dir=locks, n_devices=1, timeout_s=0.5):
            pass
        message = str(err.value)
        assert str(locks) in message and f"pid={holder.pid}" in message
        assert "gpu 0" in message
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs
        holder.wait(timeout=30)
        with lease_gpu(1, lock_dir=locks, n_devices=1, timeout_s=10) as devices:
            assert devices == ["0"]
            assert f"pid={os.getpid()}" in (locks / "gpu0.lock").read_text()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_visible_devices_set_inside_and_restored(tmp_path: Path, no_gpu_env: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with lease_gpu(1, lock_dir=tmp_path, n_devices=2) as devices:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == devices[0]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    # inside an allocation (e.g. Slurm gave GPUs 4 and 6) the pool is that list
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert device_pool() == ["4", "6"]
    with lease_gpu(1, lock_dir=tmp_path) as devices:
        assert devices[0] in ("4", "6") and os.environ["CUDA_VISIBLE_DEVICES"] == devices[0]
        assert f"pid={os.getpid()}" in (tmp_path / f"gpu{devices[0]}.lock").read_text()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"
    # released on an exception too
    with pytest.raises(ZeroDivisionError), lease_gpu(2, lock_dir=tmp_path):
        _ = 1 / 0
    with lease_gpu(2, lock_dir=tmp_path, timeout_s=0) as both:
        assert both == ["4", "6"]


def test_no_request_leases_nothing(tmp_path: Path, no_gpu_env: None) -> None:
    messages: list[str] = []
    with lease_for_job(SimpleNamespace(get=lambda key, default=None: default), log=messages.append) as devices:
        assert devices == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    with lease_gpu(0, lock_dir=tmp_path / "unused") as devices:
        assert devices == []
    assert not (tmp_path / "unused").exists() and messages == []


def test_job_lease_logs_the_device(tmp_path: Path, no_gpu_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gpus.FAKE_COUNT_ENV, "2")
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path))
    messages: list[str] = []
    with lease_for_job({"gpu": 1}, log=messages.append) as devices:
        assert len(devices) == 1
    assert messages and f"leased GPU {devices[0]}" in messages[0] and str(tmp_path) in messages[0]


def test_more_devices_than_the_pool_fail_no_gpu_leases_nothing(tmp_path: Path, no_gpu_env: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=r"2 GPU.*pool has 1"), lease_gpu(2, lock_dir=tmp_path, n_devices=1):
        pass
    monkeypatch.setenv(gpus.VISIBLE, "")  # nothing visible: an empty pool, nothing to lease
    assert device_pool() == []
    messages: list[str] = []
    with lease_gpu(1, lock_dir=tmp_path / "none", log=messages.append) as devices:
        assert devices == [] and os.environ[gpus.VISIBLE] == ""
    assert "no GPU found" in messages[0] and not (tmp_path / "none").exists()


def test_lock_dir_is_per_user_and_per_slurm_job(no_gpu_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert gpus.default_lock_dir().name == f"pruneshot-gpu-locks-{os.getuid()}"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert gpus.default_lock_dir().name.endswith("-slurm42")
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, "/shared/locks")
    assert gpus.default_lock_dir() == Path("/shared/locks")


def test_uses_gpu_decides_from_the_node_s_pool_without_torch(no_gpu_env: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_torch() -> int:
        raise AssertionError("uses_gpu must not ask torch")

    monkeypatch.setattr(gpus, "_torch_count", no_torch)
    monkeypatch.setenv(gpus.FAKE_COUNT_ENV, "2")
    assert uses_gpu("auto") and uses_gpu("cuda") and not uses_gpu("cpu")
    monkeypatch.setenv(gpus.FAKE_COUNT_ENV, "0")
    assert not uses_gpu("auto") and uses_gpu("cuda")  # cuda always asks for one (and fails without)
    monkeypatch.delenv(gpus.FAKE_COUNT_ENV)
    monkeypatch.setenv(gpus.VISIBLE, "")  # nothing visible
    assert not uses_gpu("auto")
    monkeypatch.setenv(gpus.VISIBLE, "3")  # e.g. a Slurm allocation's GPU
    assert uses_gpu("auto")
    monkeypatch.delenv(gpus.VISIBLE)
    monkeypatch.setattr(gpus, "_nvml_count", lambda: 2)
    assert uses_gpu("auto")
    monkeypatch.setattr(gpus, "_nvml_count", lambda: None)  # no libnvidia-ml: no driver, so no GPU
    assert not uses_gpu("auto") and not gpus.node_has_gpu()
    with pytest.raises(ValueError, match="unknown device setting 'gpu'"):
        uses_gpu("gpu")


def _gpu_requests(text: str) -> dict[str, set[int]]:
    """rule (search: search[method]) -> the gpu values of its jobs in `snakemake -n` output."""
    out: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        resources = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if not rule or not resources:
            continue
        gpu = re.search(r"\bgpu=(\d+)", resources.group(1))
        method = re.search(r"\bmethod=(\w+)", block)
        name = f"search[{method.group(1)}]" if rule.group(1) == "search" else rule.group(1)
        out.setdefault(name, set()).add(int(gpu.group(1)) if gpu else 0)
    return out


@pytest.mark.parametrize("fake", [2, 0], ids=["gpu_node", "cpu_node"])
def test_dry_run_requests_a_gpu_for_every_job_that_uses_cuda(fake: int, tmp_path: Path) -> None:
    """With `device: auto` (the study's pretrain and transfer devices, profile.devices with cuda), every job
    that will use CUDA on a node with GPUs declares gpu=1; on a node without, none does."""
    from pruneshot.config import load_config
    from pruneshot.methods import get_method

    study = ROOT / "config/studies/mnist_to_fashion.yaml"
    cfg = load_config(study)
    assert cfg["pretrain"]["device"] == cfg["transfer"]["device"] == "auto" and "cuda" in cfg["profile"]["devices"]
    for part in ("workflow", "config", "scripts", "envs"):
        shutil.copytree(ROOT / part, tmp_path / part)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNESHOT_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", gpus.FAKE_COUNT_ENV: str(fake), gpus.VISIBLE: ""})
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "4", "--configfile", str(study)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    requests = _gpu_requests(proc.stdout)
    on_gpu = {"pretrain", "transfer", "select_transfer", "profile", "profile_adapted"}
    on_gpu |= {f"search[{m}]" for m in cfg["methods"] if get_method(m).side == "source" and get_method(m).uses_device}
    assert on_gpu <= set(requests) and any(name.startswith("search[") for name in on_gpu)
    for name, values in requests.items():
        assert values == ({1} if fake and name in on_gpu else {0}), (name, values)
