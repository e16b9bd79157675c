"""Tests for pruneshot.data.downloads (a real local HTTP server) and pruneshot.data.formats (real file formats)."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import struct
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from pruneshot.data.downloads import DownloadError, fetch
from pruneshot.data.formats import read_cifar_binary_tar, read_idx_gz, read_image_folder, read_svhn_mat

# ----------------------------------------------------------------------------- HTTP server


@dataclass
class ServerState:
    data: bytes = b""
    status: int | None = None  # if set, answer every request with this error status
    fail_first: int = 0  # answer the first k requests with 500
    truncate_first: int = 0  # cut the body in half for the first k (successful) requests
    ignore_range: bool = False
    trickle: tuple[int, float] | None = None  # send the body N bytes at a time, sleeping S seconds between
    ranges: list[str | None] = field(default_factory=list)  # Range header of every request, in order
    served: list[int] = field(default_factory=list)  # status code of every request


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        st: ServerState = self.server.state  # type: ignore[attr-defined]
        n = len(st.ranges)
        rng = self.headers.get("Range")
        st.ranges.append(rng)
        if st.status is not None:
            st.served.append(st.status)
            self.send_error(st.status)
            return
        if n < st.fail_first:
            st.served.append(500)
            self.send_error(500)
            return
        body, code = st.data, 200
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not st.ignore_range:
            start = int(m.group(1))
            body, code = st.data[start:], 206
        st.served.append(code)
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(st.data) - 1}/{len(st.data)}")
        self.end_headers()
        successes = sum(1 for c in st.served if c in (200, 206))
        if st.trickle is not None:
            step, pause = st.trickle
            try:
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:  # the client gave up
                pass
            self.close_connection = True
            return
        if successes <= st.truncate_first:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def _local_http(no_proxy):
    """Every test here talks to a server on 127.0.0.1: bypass any configured proxy."""


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.state = ServerState(data=np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/file.bin"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


FAST = {"backoff_s": 0.01, "timeout_s": 5}

# ----------------------------------------------------------------------------- fetch


def test_fetch_ok_with_sha256(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    out = fetch(_url(server), dest, _sha(server.state.data), **FAST)
    assert out == dest
    assert dest.read_bytes() == server.state.data
    assert not dest.with_suffix(".bin.part").exists()
    assert server.state.ranges == [None]


def test_fetch_wrong_sha256_leaves_nothing(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError) as ei:
        fetch(_url(server), dest, "0" * 64, **FAST)
    msg = str(ei.value)
    assert _url(server) in msg and "0" * 64 in msg and _sha(server.state.data) in msg
    assert list(tmp_path.iterdir()) == []
    assert len(server.state.ranges) == 1  # a checksum mismatch is not retried


def test_fetch_404_fails_at_once(server, tmp_path):
    server.state.status = 404
    with pytest.raises(DownloadError, match="404"):
        fetch(_url(server), tmp_path / "file.bin", None, attempts=5, **FAST)
    assert server.state.served == [404]
    assert list(tmp_path.iterdir()) == []


def test_fetch_403_fails_at_once(server, tmp_path):
    server.state.status = 403
    with pytest.raises(DownloadError, match="403"):
        fetch(_url(server), tmp_path / "file.bin", None, attempts=5, **FAST)
    assert server.state.served == [403]


def test_fetch_retries_500(server, tmp_path):
    server.state.fail_first = 2
    dest = fetch(_url(server), tmp_path / "file.bin", _sha(server.state.data), attempts=3, **FAST)
    assert dest.read_bytes() == server.state.data
    assert server.state.served == [500, 500, 200]


def test_fetch_500_exhausts_attempts(server, tmp_path):
    server.state.fail_first = 10
    with pytest.raises(DownloadError, match="3 attempts"):
        fetch(_url(server), tmp_path / "file.bin", None, attempts=3, **FAST)
    assert server.state.served == [500, 500, 500]
    assert list(tmp_path.iterdir()) == []


def test_fetch_truncated_then_whole(server, tmp_path):
    server.state.truncate_first = 1
    data = server.state.data
    dest = fetch(_url(server), tmp_path / "file.bin", _sha(data), attempts=3, **FAST)
    assert dest.read_bytes() == data
    # the retry resumed from the half that had arrived
    assert server.state.ranges == [None, f"bytes={len(data) // 2}-"]
    assert server.state.served == [200, 206]


def test_fetch_always_truncated_fails_and_keeps_the_part_for_the_next_run(server, tmp_path):
    server.state.truncate_first = 10**6
    data = server.state.data
    dest = tmp_path / "file.bin"
    part = dest.with_suffix(".bin.part")
    with pytest.raises(DownloadError, match="truncated") as ei:
        fetch(_url(server), dest, None, attempts=3, **FAST)
    assert len(server.state.served) == 3
    kept = part.stat().st_size
    assert list(tmp_path.iterdir()) == [part] and part.read_bytes() == data[:kept]
    assert f"{part} ({kept} bytes) is kept for the next run to resume" in str(ei.value)
    # a later run resumes it
    server.state.truncate_first = 0
    assert fetch(_url(server), dest, _sha(data), **FAST).read_bytes() == data
    assert server.state.ranges[-1] == f"bytes={kept}-" and server.state.served[-1] == 206
    assert not part.exists()


def test_fetch_resumes_part_with_range(server, tmp_path):
    data = server.state.data
    dest = tmp_path / "file.bin"
    k = 12_345
    dest.with_suffix(".bin.part").write_bytes(data[:k])
    fetch(_url(server), dest, _sha(data), **FAST)
    assert server.state.ranges == [f"bytes={k}-"]
    assert server.state.served == [206]
    assert dest.read_bytes() == data
    assert not dest.with_suffix(".bin.part").exists()


def test_fetch_restarts_when_range_ignored(server, tmp_path):
    server.state.ignore_range = True
    data = server.state.data
    dest = tmp_path / "file.bin"
    dest.with_suffix(".bin.part").write_bytes(b"\xff" * 7000)  # stale junk that must not survive
    fetch(_url(server), dest, _sha(data), **FAST)
    assert server.state.ranges == ["bytes=7000-"]
    assert server.state.served == [200]
    assert dest.read_bytes() == data


def test_fetch_existing_verified_dest_makes_no_request(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(server.state.data)
    assert fetch(_url(server), dest, _sha(server.state.data), **FAST) == dest
    assert server.state.ranges == []


def test_fetch_existing_wrong_dest_is_replaced(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old contents")
    fetch(_url(server), dest, _sha(server.state.data), **FAST)
    assert dest.read_bytes() == server.state.data
    assert len(server.state.ranges) == 1


def test_fetch_gives_up_on_a_trickle_and_a_later_run_resumes(server, tmp_path):
    """16 bytes every 20 ms (800 bytes/s) with a correct Content-Length: every read arrives well within
    timeout_s, so only the minimum rate stops it."""
    data = server.state.data
    server.state.trickle = (16, 0.02)
    dest = tmp_path / "file.bin"
    part = dest.with_suffix(".bin.part")
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as ei:
        fetch(_url(server), dest, _sha(data), attempts=2, min_rate_bps=5000, rate_window_s=0.3, **FAST)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    kept = part.stat().st_size
    assert 0 < kept < len(data) and part.read_bytes() == data[:kept]
    assert msg.startswith(f"{_url(server)}: failed after 2 attempts: transfer too slow: ")
    assert "below the minimum of 5000 bytes/s (data.download.min_rate_bps)" in msg
    assert re.search(rf"; {kept} of {len(data)} bytes received; ", msg), msg
    assert f"{part} ({kept} bytes) is kept for the next run to resume" in msg
    assert server.state.ranges[0] is None and re.fullmatch(r"bytes=\d+-", server.state.ranges[1])  # 2nd resumed
    # a later run resumes the kept .part with a Range request
    server.state.trickle = None
    assert fetch(_url(server), dest, _sha(data), **FAST).read_bytes() == data
    assert server.state.ranges[-1] == f"bytes={kept}-" and server.state.served[-1] == 206
    assert not part.exists()


def test_fetch_min_rate_lets_a_steady_transfer_through(server, tmp_path):
    server.state.trickle = (10_000, 0.05)  # 200 kB/s: above the minimum
    data = server.state.data
    dest = fetch(_url(server), tmp_path / "file.bin", _sha(data), min_rate_bps=5000, rate_window_s=0.1, **FAST)
    assert dest.read_bytes() == data and server.state.ranges == [None]


def test_fetch_rejects_bad_rate_settings(tmp_path):
    with pytest.raises(ValueError, match="min_rate_bps must be >= 0"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x", None, min_rate_bps=-1)
    with pytest.raises(ValueError, match="rate_window_s must be > 0"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x", None, rate_window_s=0)


def test_fetch_connection_refused_retries_then_fails(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens on this port now
    with pytest.raises(DownloadError, match="2 attempts"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", None, attempts=2, **FAST)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- IDX


def _write_idx_images(path: Path, imgs: np.ndarray, magic: int = 2051, count: int | None = None) -> None:
    n, h, w = imgs.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">iiii", magic, n if count is None else count, h, w) + imgs.tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray, magic: int = 2049) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">ii", magic, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def idx_files(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 7], dtype=np.uint8)
    ip, lp = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx_images(ip, imgs)
    _write_idx_labels(lp, labels)
    return ip, lp, imgs, labels


def test_read_idx_roundtrip(idx_files):
    ip, lp, imgs, labels = idx_files
    x, y = read_idx_gz(ip, lp)
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist() == [3, 0, 9, 1, 7]
    assert np.array_equal(x[:, 0].numpy(), imgs)


def test_read_idx_bad_magic(idx_files, tmp_path):
    ip, lp, imgs, _ = idx_files
    _write_idx_images(ip, imgs, magic=2049)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*magic 2049.*2051"):
        read_idx_gz(ip, lp)


def test_read_idx_count_mismatch(idx_files):
    ip, lp, _, labels = idx_files
    _write_idx_labels(lp, labels[:4])
    with pytest.raises(ValueError, match=r"count mismatch.*5 images.*4 labels"):
        read_idx_gz(ip, lp)


def test_read_idx_truncated_payload(idx_files):
    ip, lp, imgs, _ = idx_files
    _write_idx_images(ip, imgs[:4], count=5)  # header promises 5 images, body holds 4
    with pytest.raises(ValueError, match=r"train-images.*truncated"):
        read_idx_gz(ip, lp)


def test_read_idx_truncated_gzip(idx_files):
    ip, lp, _, _ = idx_files
    raw = ip.read_bytes()
    ip.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"train-images.*truncated"):
        read_idx_gz(ip, lp)


# ----------------------------------------------------------------------------- CIFAR


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_cifar10_tar(tmp_path):
    rng = np.random.default_rng(2)
    members, want_x, want_y = {}, [], []
    for i, n in enumerate((4, 3)):
        pix = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        lab = rng.integers(0, 10, n, dtype=np.uint8)
        recs = np.concatenate([lab[:, None], pix.reshape(n, -1)], axis=1)
        members[f"cifar-10-batches-bin/data_batch_{i + 1}.bin"] = recs.tobytes()
        want_x.append(pix)
        want_y.append(lab)
    members["cifar-10-batches-bin/test_batch.bin"] = bytes(2 * 3073)
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    p = tmp_path / "cifar-10-binary.tar.gz"
    _tar_gz(p, members)
    x, y = read_cifar_binary_tar(
        p, ["cifar-10-batches-bin/data_batch_1.bin", "cifar-10-batches-bin/data_batch_2.bin"], 1
    )
    assert x.dtype == torch.uint8 and x.shape == (7, 3, 32, 32)
    assert y.dtype == torch.int64
    assert np.array_equal(x.numpy(), np.concatenate(want_x))
    assert y.tolist() == np.concatenate(want_y).tolist()
    xt, yt = read_cifar_binary_tar(p, ["cifar-10-batches-bin/test_batch.bin"], 1)
    assert xt.shape == (2, 3, 32, 32) and int(xt.sum()) == 0 and yt.tolist() == [0, 0]


def test_read_cifar100_uses_fine_label(tmp_path):
    rng = np.random.default_rng(3)
    n = 5
    pix = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    coarse = np.array([1, 2, 3, 4, 5], dtype=np.uint8)
    fine = np.array([99, 50, 0, 17, 42], dtype=np.uint8)
    recs = np.concatenate([coarse[:, None], fine[:, None], pix.reshape(n, -1)], axis=1)
    p = tmp_path / "cifar-100-binary.tar.gz"
    _tar_gz(p, {"cifar-100-binary/train.bin": recs.tobytes(), "cifar-100-binary/test.bin": recs[:1].tobytes()})
    x, y = read_cifar_binary_tar(p, ["cifar-100-binary/train.bin"], 2)
    assert y.tolist() == [99, 50, 0, 17, 42]
    assert np.array_equal(x.numpy(), pix)


def test_read_cifar_truncated_archive(tmp_path):
    rng = np.random.default_rng(4)
    recs = rng.integers(0, 256, (20, 3073), dtype=np.uint8)  # incompressible, so the cut hits the member data
    p = tmp_path / "cifar-10-binary.tar.gz"
    _tar_gz(p, {"cifar-10-batches-bin/data_batch_1.bin": recs.tobytes()})
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz.*truncated"):
        read_cifar_binary_tar(p, ["cifar-10-batches-bin/data_batch_1.bin"], 1)


def test_read_cifar_bad_record_size_and_missing_member(tmp_path):
    p = tmp_path / "c.tar.gz"
    _tar_gz(p, {"cifar-10-batches-bin/data_batch_1.bin": bytes(3073 * 2 + 1)})
    with pytest.raises(ValueError, match=r"data_batch_1\.bin.*6147 bytes.*3073-byte record"):
        read_cifar_binary_tar(p, ["cifar-10-batches-bin/data_batch_1.bin"], 1)
    with pytest.raises(ValueError, match=r"data_batch_9\.bin.*not found"):
        read_cifar_binary_tar(p, ["cifar-10-batches-bin/data_batch_9.bin"], 1)


# ----------------------------------------------------------------------------- SVHN


def test_read_svhn_mat(tmp_path):
    rng = np.random.default_rng(5)
    n = 6
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    labels = np.array([10, 1, 5, 10, 9, 2], dtype=np.uint8).reshape(n, 1)
    p = tmp_path / "train_32x32.mat"
    scipy.io.savemat(p, {"X": X, "y": labels})
    x, y = read_svhn_mat(p)
    assert x.dtype == torch.uint8 and x.shape == (n, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 5, 0, 9, 2]
    for i in range(n):
        assert np.array_equal(x[i].numpy(), X[:, :, :, i].transpose(2, 0, 1))


# ----------------------------------------------------------------------------- image folder


def test_read_image_folder_rgb_and_gray(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "imgs"
    written = {}
    for cls, names in {"b_zebra": ["1.png", "2.PNG"], "a_ant": ["x.png"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(a, "RGB").save(root / cls / name)
            written[(cls, name)] = a
    (root / "a_ant" / "notes.txt").write_text("not an image")
    x, y = read_image_folder(root, 16, 3)
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 16, 16)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 1]  # a_ant -> 0, b_zebra -> 1
    order = [("a_ant", "x.png"), ("b_zebra", "1.png"), ("b_zebra", "2.PNG")]
    for i, key in enumerate(order):
        assert np.array_equal(x[i].numpy(), written[key].transpose(2, 0, 1))
    xg, _ = read_image_folder(root, 16, 1)
    assert xg.shape == (3, 1, 16, 16)
    want_gray = np.asarray(Image.fromarray(written[("a_ant", "x.png")], "RGB").convert("L"))
    assert np.array_equal(xg[0, 0].numpy(), want_gray)


def test_read_image_folder_resizes(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "c" / "a.jpg", quality=100)
    Image.new("L", (5, 5), 77).save(tmp_path / "c" / "b.bmp")
    x, y = read_image_folder(tmp_path, 8, 3)
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 0]
    assert (x[0, 0].int() - 10).abs().max() <= 3 and (x[0, 1].int() - 200).abs().max() <= 3
    assert (x[1] == 77).all()


def test_read_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_image_folder(tmp_path / "nope", 8, 3)
    (tmp_path / "stray.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folders"):
        read_image_folder(tmp_path, 8, 3)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "ok.png")
    with pytest.raises(ValueError, match=r"class folder .*dog.* no images"):
        read_image_folder(tmp_path, 8, 3)
    (tmp_path / "dog" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.png"):
        read_image_folder(tmp_path, 8, 3)
