"""Real dataset formats end to end: tiny files in the exact official formats and names (gzip IDX,
CIFAR binary tar.gz, SVHN .mat, a folder of PNGs), served over HTTP from 127.0.0.1, downloaded,
verified, converted and prepared by the same code the pipeline runs; plus the config checks and
one real Snakemake run."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image

from pruneshot.config import ConfigError, validate_config
from pruneshot.data import prepare as data
from pruneshot.data.registry import REGISTRY, effective_shape, resolve_split
from pruneshot.io import load_tensors, read_json
from pruneshot.stages.data import prepare_source, prepare_target
from pruneshot.stages.job import Job

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
DOWNLOADED = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"]

# ----------------------------------------------------------------------------- generated datasets

# Labels per split, chosen so every class used below has at least 3 images in each split.
LABELS = {
    "mnist": {"train": [0, 1, 2, 3, 4, 5] * 4, "test": [5, 3, 4, 0, 1, 2] * 3},
    "fashion_mnist": {"train": [9, 8, 7, 0, 1, 2] * 4, "test": [2, 1, 0, 7, 8, 9] * 3},
    "cifar10": {"train": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2, "test": [9, 3, 4, 5, 0] * 3},
    "cifar100": {"train": [0, 42, 99, 7, 57] * 4, "test": [57, 7, 99, 0, 42] * 3},
    "svhn": {"train": [1, 2, 10, 3, 4, 5] * 4, "test": [5, 4, 3, 10, 2, 1] * 3},  # 10 is digit 0
}


@dataclass
class Generated:
    """Official-format files of one dataset and the arrays they hold (labels as pruneshot reads them)."""

    files: dict[str, bytes]
    x: dict[str, np.ndarray]  # split -> (N, C, H, W) uint8
    y: dict[str, np.ndarray]  # split -> (N,) int64

    def sha(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _generate(name: str, tmp: Path) -> Generated:
    rng = np.random.default_rng(sum(map(ord, name)))
    labels = {s: np.array(v, dtype=np.uint8) for s, v in LABELS[name].items()}
    files: dict[str, bytes] = {}
    xs, ys = {}, {}
    if name in ("mnist", "fashion_mnist"):
        for split, prefix in (("train", "train"), ("test", "t10k")):
            lab = labels[split]
            img = rng.integers(0, 256, (len(lab), 28, 28), dtype=np.uint8)
            files[f"{prefix}-images-idx3-ubyte.gz"] = _gz(struct.pack(">iiii", 2051, len(lab), 28, 28) + img.tobytes())
            files[f"{prefix}-labels-idx1-ubyte.gz"] = _gz(struct.pack(">ii", 2049, len(lab)) + lab.tobytes())
            xs[split], ys[split] = img[:, None], lab.astype(np.int64)
    elif name in ("cifar10", "cifar100"):
        members = {}
        for split in ("train", "test"):
            lab = labels[split]
            pix = rng.integers(0, 256, (len(lab), 3, 32, 32), dtype=np.uint8)
            if name == "cifar10":
                recs = np.concatenate([lab[:, None], pix.reshape(len(lab), -1)], axis=1)
                if split == "train":  # five batches, as published
                    for i, part in enumerate(np.array_split(recs, 5)):
                        members[f"cifar-10-batches-bin/data_batch_{i + 1}.bin"] = part.tobytes()
                else:
                    members["cifar-10-batches-bin/test_batch.bin"] = recs.tobytes()
            else:
                coarse = (lab // 5).astype(np.uint8)
                recs = np.concatenate([coarse[:, None], lab[:, None], pix.reshape(len(lab), -1)], axis=1)
                members[f"cifar-100-binary/{split}.bin"] = recs.tobytes()
            xs[split], ys[split] = pix, lab.astype(np.int64)
        if name == "cifar10":
            members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
            files["cifar-10-binary.tar.gz"] = _tar_gz(members)
        else:
            members["cifar-100-binary/fine_label_names.txt"] = b"apple\n"
            files["cifar-100-binary.tar.gz"] = _tar_gz(members)
    elif name == "svhn":
        for split in ("train", "test"):
            lab = labels[split]
            X = rng.integers(0, 256, (32, 32, 3, len(lab)), dtype=np.uint8)
            path = tmp / f"{split}_32x32.mat"
            scipy.io.savemat(path, {"X": X, "y": lab.reshape(-1, 1)})
            files[path.name] = path.read_bytes()
            xs[split] = X.transpose(3, 2, 0, 1).copy()
            ys[split] = np.where(lab == 10, 0, lab).astype(np.int64)
    return Generated(files=files, x=xs, y=ys)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Generated]:
    tmp = tmp_path_factory.mktemp("gen")
    return {name: _generate(name, tmp) for name in DOWNLOADED}


# ----------------------------------------------------------------------------- HTTP server


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    status: dict[str, int] = field(default_factory=dict)  # URL path -> forced error status
    requests: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        st: ServerState = self.server.state  # type: ignore[attr-defined]
        st.requests.append(self.path)
        if self.path in st.status:
            self.send_error(st.status[self.path])
            return
        if self.path not in st.files:
            self.send_error(404)
            return
        body, code, start = st.files[self.path], 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m:
            start, code = int(m.group(1)), 206
        self.send_response(code)
        self.send_header("Content-Length", str(len(body) - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture(autouse=True)
def _local_http(no_proxy):
    """Every test here talks to a server on 127.0.0.1: bypass any configured proxy."""


@pytest.fixture(scope="module")
def _server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.state = ServerState()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture
def server(_server, generated):
    """The module's server, reset to serve every generated dataset under /<dataset>/<file>."""
    _server.state = ServerState(files={f"/{ds}/{n}": b for ds, g in generated.items() for n, b in g.files.items()})
    return _server


def mirror(srv, dataset: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{dataset}/"


# ----------------------------------------------------------------------------- config helpers


def make_config(tmp: Path, srv, generated, source: dict, targets: dict, image: dict | None = None,
                checksums: dict | None = None, validate: bool = True) -> dict:
    """The default config with a data section pointing every dataset at the local server."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    pins = {ds: {n: g.sha(n) for n in g.files} for ds, g in generated.items()}
    for ds, files in (checksums or {}).items():
        pins.setdefault(ds, {}).update(files)
    cfg["data"] = {
        "cache_dir": str(tmp / "cache"),
        "download": {"mirrors": {ds: mirror(srv, ds) for ds in DOWNLOADED} if srv else {},
                     "checksums": pins, "attempts": 2, "timeout_s": 5},
        "image": image or {},
        "source": source,
        "targets": targets,
    }
    cfg["episodes"].update({"ways": 2, "shots": [1], "count": 2, "queries_per_class": 1})
    return validate_config(cfg) if validate else cfg


def job(cfg: dict, rule: str = "prepare") -> Job:
    return Job(rule=rule, wildcards={}, config=cfg)


def pairs(x: np.ndarray, y: np.ndarray) -> Counter:
    return Counter((img.tobytes(), int(lab)) for img, lab in zip(np.ascontiguousarray(x), y, strict=True))


def subset(g: Generated, split: str, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    parts = ("train", "test") if split == "all" else (split,)
    x = np.concatenate([g.x[p] for p in parts])
    y = np.concatenate([g.y[p] for p in parts])
    keep = np.isin(y, classes)
    return x[keep], y[keep]


def leftovers(out_dir: Path) -> list[str]:
    """Anything prepare left at or beside ``out_dir`` (it must leave nothing on failure)."""
    found = [p.name for p in out_dir.parent.iterdir() if p.name.startswith((out_dir.name, f".{out_dir.name}"))]
    return sorted(found)


SOURCE_CLASSES = {"mnist": [2, 0, 1], "fashion_mnist": [9, 7, 8], "cifar10": [5, 3, 4], "cifar100": [99, 0, 42],
                  "svhn": [0, 1, 2]}
TARGET_CLASSES = {"mnist": [3, 4, 5], "fashion_mnist": [0, 1, 2], "cifar10": [0, 9], "cifar100": [7, 57],
                  "svhn": [3, 4, 5]}


# ----------------------------------------------------------------------------- every dataset


@pytest.mark.parametrize("name", DOWNLOADED)
def test_prepare_downloaded_dataset(name, server, generated, tmp_path):
    g = generated[name]
    src_cls, tgt_cls = SOURCE_CLASSES[name], TARGET_CLASSES[name]
    cfg = make_config(tmp_path, server, generated, {"dataset": name, "classes": src_cls},
                      {"t": {"dataset": name, "classes": tgt_cls}})
    assert cfg["data"]["source"]["split"] is None and cfg["data"]["targets"]["t"]["split"] is None

    src = prepare_source(cfg, tmp_path / "source", job(cfg))
    spec = REGISTRY[name]
    assert src["dataset"] == name and src["split"] == "train" and src["role"] == "source"
    assert src["classes"] == src_cls
    assert src["class_names"] == [spec.class_names[c] for c in src_cls]
    assert src["image_shape"] == list(spec.shape) == src["native_shape"]
    assert src["max_value"] == 255
    train_files = [f.name for f in spec.files_for("train")]
    assert [f["file"] for f in src["source_files"]] == train_files
    for f in src["source_files"]:
        assert f["sha256"] == g.sha(f["file"]) == hashlib.sha256((tmp_path / "cache" / name / f["file"])
                                                                 .read_bytes()).hexdigest()
        assert f["size"] == len(g.files[f["file"]])
    # only the training files were requested, each once
    assert sorted(server.state.requests) == sorted(f"/{name}/{f}" for f in train_files)

    tr = load_tensors(tmp_path / "source" / "train.safetensors")
    va = load_tensors(tmp_path / "source" / "val.safetensors")
    want_x, want_y = subset(g, "train", src_cls)
    got = pairs(tr["x"].numpy(), tr["orig_y"].numpy()) + pairs(va["x"].numpy(), va["orig_y"].numpy())
    assert got == pairs(want_x, want_y)
    assert [src_cls[v] for v in tr["y"].tolist()] == tr["orig_y"].tolist()
    assert tr["x"].dtype == torch.uint8 and tuple(tr["x"].shape[1:]) == spec.shape

    tgt = prepare_target(cfg, "t", tmp_path / "target", job(cfg))
    assert tgt["split"] == "test" and tgt["classes"] == tgt_cls and tgt["role"] == "target"
    pool = load_tensors(tmp_path / "target" / "pool.safetensors")
    want_x, want_y = subset(g, "test", tgt_cls)
    assert np.array_equal(pool["x"].numpy(), want_x)  # same images, same order
    assert pool["orig_y"].tolist() == want_y.tolist()
    assert pool["y"].tolist() == [tgt_cls.index(v) for v in want_y.tolist()]
    assert tgt["class_counts"] == {str(c): int((want_y == c).sum()) for c in tgt_cls}
    assert read_json(tmp_path / "target" / "manifest.json") == tgt
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["manifest.json", "pool.safetensors"]


def test_svhn_label_10_is_digit_0(server, generated, tmp_path):
    raw = data.load_raw("svhn", tmp_path / "cache", split="train",
                        download=make_config(tmp_path, server, generated, {"dataset": "svhn", "classes": [0, 1]},
                                             {"t": {"dataset": "svhn", "classes": [2, 3]}})["data"]["download"])
    assert raw.y.tolist() == [0 if v == 10 else v for v in LABELS["svhn"]["train"]]
    assert raw.class_names[0] == "0"


def test_split_all_is_train_then_test_and_cache_is_reused(server, generated, tmp_path):
    cfg = make_config(tmp_path, server, generated, {"dataset": "mnist", "classes": [0, 1], "split": "test"},
                      {"t": {"dataset": "mnist", "classes": [3, 4], "split": "all"}})
    m = prepare_target(cfg, "t", tmp_path / "t", job(cfg))
    assert m["split"] == "all"
    assert [f["file"] for f in m["source_files"]] == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz"]
    want_x, want_y = subset(generated["mnist"], "all", [3, 4])
    pool = load_tensors(tmp_path / "t" / "pool.safetensors")
    assert np.array_equal(pool["x"].numpy(), want_x) and pool["orig_y"].tolist() == want_y.tolist()
    assert len(server.state.requests) == 4

    # the source (split test) reuses the verified cache: no request at all
    src = prepare_source(cfg, tmp_path / "s", job(cfg))
    assert src["split"] == "test" and len(server.state.requests) == 4
    tr = load_tensors(tmp_path / "s" / "train.safetensors")
    va = load_tensors(tmp_path / "s" / "val.safetensors")
    assert len(tr["y"]) + len(va["y"]) == int(np.isin(generated["mnist"].y["test"], [0, 1]).sum())

    # a cached file that no longer matches its sha256 is fetched again, never used
    cached = tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-3] + b"xyz")
    prepare_source(cfg, tmp_path / "s", job(cfg))
    assert server.state.requests[4:] == ["/mnist/t10k-labels-idx1-ubyte.gz"]
    assert cached.read_bytes() == generated["mnist"].files[cached.name]


def test_prepare_replaces_an_existing_output_dir(server, generated, tmp_path):
    cfg = make_config(tmp_path, server, generated, {"dataset": "mnist", "classes": [0, 1]},
                      {"t": {"dataset": "fashion_mnist", "classes": [0, 1]}})
    out = tmp_path / "t"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    prepare_target(cfg, "t", out, job(cfg))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "pool.safetensors"]
    assert leftovers(out) == ["t"]


def test_mirror_does_not_change_the_prepared_data(server, generated, tmp_path):
    """The same files from an HTTP mirror and from a file:// mirror give identical prepared data."""
    local = tmp_path / "mirror"
    local.mkdir()
    for n, b in generated["mnist"].files.items():
        (local / n).write_bytes(b)
    manifests = []
    for i, url in enumerate([mirror(server, "mnist"), local.as_uri() + "/"]):
        cfg = make_config(tmp_path / str(i), server, generated, {"dataset": "digits", "classes": [0, 1]},
                          {"t": {"dataset": "mnist", "classes": [3, 4]}}, image={"size": 8})
        cfg["data"]["download"]["mirrors"] = {"mnist": url}
        manifests.append(prepare_target(cfg, "t", tmp_path / str(i) / "t", job(cfg)))
    # the data are the same; only the job's provenance (config hash: the mirror setting) differs
    assert manifests[0].pop("provenance")["config_sha256"] != manifests[1].pop("provenance")["config_sha256"]
    assert manifests[0] == manifests[1]
    assert len(server.state.requests) == 2  # the second run read the local directory


# ----------------------------------------------------------------------------- reconciliation


def test_gray_source_to_rgb_target_shape(server, generated, tmp_path):
    cfg = make_config(tmp_path, server, generated, {"dataset": "mnist", "classes": [0, 1, 2]},
                      {"c": {"dataset": "cifar10", "classes": [0, 9]}}, image={"channels": 3, "size": 32})
    src = prepare_source(cfg, tmp_path / "s", job(cfg))
    tgt = prepare_target(cfg, "c", tmp_path / "c", job(cfg))
    assert src["image_shape"] == tgt["image_shape"] == [3, 32, 32]
    assert src["native_shape"] == [1, 28, 28] and src["conversion"] == {"channels": 3, "size": 32}
    assert tgt["native_shape"] == [3, 32, 32]
    # the target already has the shape: its images are untouched
    pool = load_tensors(tmp_path / "c" / "pool.safetensors")
    assert np.array_equal(pool["x"].numpy(), subset(generated["cifar10"], "test", [0, 9])[0])
    # source: bilinear antialias resize of the gray image, replicated to 3 equal channels
    tr, va = (load_tensors(tmp_path / "s" / f"{s}.safetensors") for s in ("train", "val"))
    x = torch.cat([tr["x"], va["x"]])
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    raw_x, _ = subset(generated["mnist"], "train", [0, 1, 2])
    ref = torch.nn.functional.interpolate(torch.from_numpy(raw_x).double(), size=(32, 32), mode="bilinear",
                                          align_corners=False, antialias=True).round().clamp(0, 255)
    got = Counter(img.tobytes() for img in x[:, :1].numpy())
    assert got == Counter(img.tobytes() for img in ref.to(torch.uint8).numpy())


def test_rgb_source_to_gray_target_shape(server, generated, tmp_path):
    cfg = make_config(tmp_path, server, generated, {"dataset": "cifar10", "classes": [3, 4, 5]},
                      {"m": {"dataset": "mnist", "classes": [3, 4]}}, image={"channels": 1, "size": 28})
    src = prepare_source(cfg, tmp_path / "s", job(cfg))
    tgt = prepare_target(cfg, "m", tmp_path / "m", job(cfg))
    assert src["image_shape"] == tgt["image_shape"] == [1, 28, 28]
    pool = load_tensors(tmp_path / "m" / "pool.safetensors")
    assert np.array_equal(pool["x"].numpy(), subset(generated["mnist"], "test", [3, 4])[0])
    raw_x, raw_y = subset(generated["cifar10"], "train", [3, 4, 5])
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), raw_x.astype(np.float64), axes=([0], [1]))[:, None]
    ref = torch.nn.functional.interpolate(torch.from_numpy(luma), size=(28, 28), mode="bilinear",
                                          align_corners=False, antialias=True).round().clamp(0, 255).numpy()
    tr, va = (load_tensors(tmp_path / "s" / f"{s}.safetensors") for s in ("train", "val"))
    x = torch.cat([tr["x"], va["x"]]).numpy().astype(np.int64)
    y = torch.cat([tr["orig_y"], va["orig_y"]]).numpy()
    assert x.shape == (len(raw_y), 1, 28, 28)
    # match images by label and order (float32 vs float64 rounding may differ by one level)
    for c in (3, 4, 5):
        mine, theirs = x[y == c], ref[raw_y == c]
        assert mine.shape == theirs.shape
        best = [min(np.abs(m - t).max() for t in theirs) for m in mine]
        assert max(best) <= 1


def test_reconcile_known_values():
    rgb = np.zeros((3, 3, 2, 2), dtype=np.uint8)
    rgb[0, 0], rgb[1, 1], rgb[2, 2] = 255, 255, 255  # pure red, green, blue
    gray = data.reconcile(rgb, 255, channels=1)
    assert gray.shape == (3, 1, 2, 2) and gray.dtype == np.uint8
    assert gray[:, 0, 0, 0].tolist() == [76, 150, 29]  # 0.299, 0.587, 0.114 of 255, rounded
    g = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    assert np.array_equal(data.reconcile(g, 16, channels=3), np.repeat(g, 3, axis=1))
    const = np.full((2, 1, 8, 8), 9, dtype=np.uint8)
    assert (data.reconcile(const, 16, size=3) == 9).all()  # digits levels survive a resize
    assert data.reconcile(const, 16) is const  # nothing to do
    with pytest.raises(ValueError, match="channels"):
        data.reconcile(np.zeros((1, 2, 4, 4), np.uint8), 255, channels=3)


def test_digits_source_keeps_working_with_image_settings(tmp_path):
    cfg = make_config(tmp_path, None, {}, {"dataset": "digits", "classes": [0, 1, 2]},
                      {"t": {"dataset": "digits", "classes": [5, 6]}}, image={"size": 16})
    m = prepare_source(cfg, tmp_path / "s", job(cfg))
    assert m["split"] == "all" and m["image_shape"] == [1, 16, 16] and m["max_value"] == 16
    assert m["source_files"][0]["file"] == "sklearn.datasets.load_digits"
    assert load_tensors(tmp_path / "s" / "train.safetensors")["x"].max() <= 16


# ----------------------------------------------------------------------------- imagefolder


@pytest.fixture
def image_root(tmp_path) -> Path:
    """Four class folders (sorted: benign, cyst, malignant, normal) of 3 RGB PNGs each, 12x10 pixels."""
    rng = np.random.default_rng(7)
    root = tmp_path / "scans"
    for cls in ("normal", "benign", "malignant", "cyst"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "RGB").save(root / cls / f"{i}.png")
    (root / "README.txt").write_text("not a class")
    return root


def test_imagefolder_prepare(image_root, tmp_path):
    cfg = make_config(tmp_path, None, {},
                      {"dataset": "imagefolder", "root": str(image_root), "classes": [3, 0]},
                      {"t": {"dataset": "imagefolder", "root": str(image_root), "classes": [2, 1]}},
                      image={"size": 8})
    src = prepare_source(cfg, tmp_path / "s", job(cfg))
    tgt = prepare_target(cfg, "t", tmp_path / "t", job(cfg))
    assert src["class_names"] == ["normal", "benign"] and tgt["class_names"] == ["malignant", "cyst"]
    assert src["image_shape"] == tgt["image_shape"] == [3, 8, 8] and src["split"] == "all"
    pool = load_tensors(tmp_path / "t" / "pool.safetensors")
    assert pool["orig_y"].tolist() == [1, 1, 1, 2, 2, 2]  # cyst (1) before malignant (2): folder order
    assert pool["y"].tolist() == [1, 1, 1, 0, 0, 0]  # relabelled in the configured order
    first = Image.open(image_root / "cyst" / "0.png").convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
    assert np.array_equal(pool["x"][0].numpy(), np.asarray(first).transpose(2, 0, 1))
    h = hashlib.sha256()
    for cls in ("cyst", "malignant"):
        for i in range(3):
            h.update(f"{cls}/{i}.png\t{hashlib.sha256((image_root / cls / f'{i}.png').read_bytes()).hexdigest()}\n"
                     .encode())
    (entry,) = tgt["source_files"]
    assert entry["n_images"] == 6 and entry["sha256"] == h.hexdigest() and entry["file"] == str(image_root)


def test_imagefolder_gray_matches_mnist_shape(image_root, tmp_path, server, generated):
    cfg = make_config(tmp_path, server, generated, {"dataset": "mnist", "classes": [0, 1]},
                      {"t": {"dataset": "imagefolder", "root": str(image_root), "classes": [0, 1]}},
                      image={"channels": 1, "size": 28})
    tgt = prepare_target(cfg, "t", tmp_path / "t", job(cfg))
    assert tgt["image_shape"] == [1, 28, 28]
    pool = load_tensors(tmp_path / "t" / "pool.safetensors")
    first = Image.open(image_root / "benign" / "0.png").convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    assert np.array_equal(pool["x"][0, 0].numpy(), np.asarray(first))


@pytest.mark.parametrize(("case", "match"), [
    ("class_beyond", r"class indices \[4\] do not exist; it has 4 class folders.*benign, cyst, malignant, normal"),
    ("empty_root", "no class folders"),
    ("missing_root", "does not exist"),
    ("empty_class", r"class folder .*cyst contains no images"),
])
def test_imagefolder_errors_leave_nothing(case, match, image_root, tmp_path):
    """The job's own checks, for a folder that changes after the config was validated (validate_config rejects
    each of these up front: tests/test_config.py)."""
    cfg = make_config(tmp_path, None, {}, {"dataset": "digits", "classes": [0, 1]},
                      {"t": {"dataset": "imagefolder", "root": str(image_root), "classes": [0, 1]}},
                      image={"channels": 1, "size": 8})
    classes = [0, 1]
    root = image_root
    if case == "class_beyond":
        classes = [2, 4]
    elif case == "empty_root":
        root = tmp_path / "empty"
        root.mkdir()
    elif case == "missing_root":
        root = tmp_path / "nowhere"
    else:
        for p in (image_root / "cyst").iterdir():
            p.unlink()
    cfg["data"]["targets"]["t"].update(root=str(root), classes=classes)
    out = tmp_path / "out" / "t"
    with pytest.raises(data.DatasetError, match=match) as err:
        prepare_target(cfg, "t", out, job(cfg))
    assert "imagefolder" in str(err.value) and str(root) in str(err.value)
    assert not (tmp_path / "out").exists() or leftovers(out) == []


# ----------------------------------------------------------------------------- download failures


def _target_cfg(tmp_path, server, generated, name, **kw):
    return make_config(tmp_path, server, generated, {"dataset": "digits", "classes": [0, 1]},
                       {"t": {"dataset": name, "classes": TARGET_CLASSES[name]}},
                       image={"channels": 1, "size": 8}, **kw)


def _fails(cfg, tmp_path) -> str:
    out = tmp_path / "out" / "t"
    with pytest.raises(data.DatasetError) as err:
        prepare_target(cfg, "t", out, job(cfg))
    assert not out.exists() and (not out.parent.exists() or leftovers(out) == [])
    return str(err.value)


def test_wrong_checksum(server, generated, tmp_path):
    cfg = _target_cfg(tmp_path, server, generated, "mnist",
                      checksums={"mnist": {"t10k-images-idx3-ubyte.gz": "ab" * 32}})
    msg = _fails(cfg, tmp_path)
    assert "'mnist'" in msg and "t10k-images-idx3-ubyte.gz" in msg and "sha256 mismatch" in msg and "ab" * 32 in msg
    cache = tmp_path / "cache" / "mnist"
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()
    assert not (cache / "t10k-images-idx3-ubyte.gz.part").exists()


def test_registry_checksum_is_the_default(server, generated, tmp_path):
    # no override: the served (generated) file is not the official one, so the registry's sha256 rejects it
    cfg = _target_cfg(tmp_path, server, generated, "cifar100")
    cfg["data"]["download"]["checksums"] = {}
    msg = _fails(cfg, tmp_path)
    assert REGISTRY["cifar100"].files["test"][0].sha256 in msg and "cifar-100-binary.tar.gz" in msg
    assert not (tmp_path / "cache" / "cifar100" / "cifar-100-binary.tar.gz").exists()


def test_truncated_archive_is_not_kept(server, generated, tmp_path):
    blob = generated["cifar10"].files["cifar-10-binary.tar.gz"]
    cut = blob[: len(blob) // 2]
    server.state.files["/cifar10/cifar-10-binary.tar.gz"] = cut
    cfg = _target_cfg(tmp_path, server, generated, "cifar10",
                      checksums={"cifar10": {"cifar-10-binary.tar.gz": hashlib.sha256(cut).hexdigest()}})
    msg = _fails(cfg, tmp_path)
    assert "'cifar10'" in msg and "cifar-10-binary.tar.gz" in msg and "truncated" in msg and "removed" in msg
    assert not (tmp_path / "cache" / "cifar10" / "cifar-10-binary.tar.gz").exists()


def test_truncated_idx_payload(server, generated, tmp_path):
    # a well-formed gzip whose IDX header promises more images than it holds
    g = generated["fashion_mnist"]
    raw = gzip.decompress(g.files["t10k-images-idx3-ubyte.gz"])
    bad = _gz(raw[:-784])
    server.state.files["/fashion_mnist/t10k-images-idx3-ubyte.gz"] = bad
    cfg = _target_cfg(tmp_path, server, generated, "fashion_mnist",
                      checksums={"fashion_mnist": {"t10k-images-idx3-ubyte.gz": hashlib.sha256(bad).hexdigest()}})
    msg = _fails(cfg, tmp_path)
    assert "'fashion_mnist'" in msg and "t10k-images-idx3-ubyte.gz" in msg and "truncated" in msg
    assert not (tmp_path / "cache" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").exists()


def test_corrupt_svhn_mat(server, generated, tmp_path):
    bad = b"MATLAB 5.0 MAT-file, but not really" + bytes(100)
    server.state.files["/svhn/test_32x32.mat"] = bad
    cfg = _target_cfg(tmp_path, server, generated, "svhn",
                      checksums={"svhn": {"test_32x32.mat": hashlib.sha256(bad).hexdigest()}})
    msg = _fails(cfg, tmp_path)
    assert "'svhn'" in msg and "test_32x32.mat" in msg
    assert not (tmp_path / "cache" / "svhn" / "test_32x32.mat").exists()


@pytest.mark.parametrize(("member", "match"), [("labels", r"labels span 0\.\.12, expected 0\.\.9"),
                                               ("images", r"shape \(1, 20, 20\), expected \(1, 28, 28\)")])
def test_parsed_but_not_this_dataset(member, match, server, generated, tmp_path):
    # well-formed IDX files that cannot be Fashion-MNIST: a label 12, or 20x20 images
    n = len(LABELS["fashion_mnist"]["test"])
    if member == "labels":
        name, blob = "t10k-labels-idx1-ubyte.gz", _gz(struct.pack(">ii", 2049, n) + bytes([12] + [0] * (n - 1)))
    else:
        name, blob = "t10k-images-idx3-ubyte.gz", _gz(struct.pack(">iiii", 2051, n, 20, 20) + bytes(n * 400))
    server.state.files[f"/fashion_mnist/{name}"] = blob
    cfg = _target_cfg(tmp_path, server, generated, "fashion_mnist",
                      checksums={"fashion_mnist": {name: hashlib.sha256(blob).hexdigest()}})
    msg = _fails(cfg, tmp_path)
    assert "'fashion_mnist'" in msg and re.search(match, msg), msg
    assert not (tmp_path / "cache" / "fashion_mnist" / name).exists()


@pytest.mark.parametrize(("status", "match", "requests"), [(404, "HTTP 404", 1), (503, "2 attempts", 2)])
def test_http_error(status, match, requests, server, generated, tmp_path):
    server.state.status["/svhn/test_32x32.mat"] = status
    cfg = _target_cfg(tmp_path, server, generated, "svhn")
    msg = _fails(cfg, tmp_path)
    assert "'svhn'" in msg and "test_32x32.mat" in msg and match in msg
    assert server.state.requests == ["/svhn/test_32x32.mat"] * requests
    assert not (tmp_path / "cache" / "svhn" / "test_32x32.mat").exists()


def test_class_missing_from_the_data(server, generated, tmp_path):
    # class 6 exists in mnist but not in the generated test split
    cfg = make_config(tmp_path, server, generated, {"dataset": "digits", "classes": [0, 1]},
                      {"t": {"dataset": "mnist", "classes": [3, 6]}}, image={"size": 28})
    msg = _fails(cfg, tmp_path)
    assert "'mnist'" in msg and "'test'" in msg and "[6] have no images" in msg


# ----------------------------------------------------------------------------- config checks


def _bad(tmp_path, source, targets, image=None, **kw) -> str:
    cfg = make_config(tmp_path, None, {}, source, targets, image=image, validate=False)
    for k, v in kw.items():
        cfg["data"][k] = v
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    return str(err.value)


def test_config_shape_mismatch_without_reconciliation(tmp_path):
    msg = _bad(tmp_path, {"dataset": "mnist", "classes": [0, 1]}, {"c10": {"dataset": "cifar10", "classes": [0, 1]}})
    assert "data.image" in msg and "c10" in msg and "cifar10" in msg and "mnist" in msg
    assert "[3, 32, 32]" in msg and "[1, 28, 28]" in msg
    # only the size differs: channels alone do not fix it
    msg = _bad(tmp_path, {"dataset": "mnist", "classes": [0, 1]}, {"s": {"dataset": "svhn", "classes": [0, 1]}},
               image={"channels": 3})
    assert "[3, 28, 28]" in msg and "[3, 32, 32]" in msg


def test_config_valid_combinations(tmp_path, image_root):
    ok = make_config(tmp_path, None, {}, {"dataset": "mnist", "classes": [0, 1]},
                     {"f": {"dataset": "fashion_mnist", "classes": [0, 1]},
                      "m": {"dataset": "mnist", "classes": [2, 3], "split": "train"}})
    assert ok["data"]["image"] == {"channels": None, "size": None}
    assert ok["data"]["targets"]["f"]["root"] is None
    make_config(tmp_path, None, {}, {"dataset": "svhn", "classes": [0, 1]},
                {"c": {"dataset": "cifar100", "classes": [98, 99]}})
    make_config(tmp_path, None, {}, {"dataset": "mnist", "classes": [0, 1]},
                {"c": {"dataset": "cifar100", "classes": [0, 1]}}, image={"channels": 3, "size": 32})
    # two image folders are different datasets: the same class indices may appear in both
    shutil.copytree(image_root, tmp_path / "other")
    make_config(tmp_path, None, {}, {"dataset": "imagefolder", "root": str(image_root), "classes": [0, 1]},
                {"t": {"dataset": "imagefolder", "root": str(tmp_path / "other"), "classes": [0, 1]}},
                image={"size": 16})


@pytest.mark.parametrize(("source", "target", "fragments"), [
    ({"dataset": "mnist", "classes": [0, 10]}, {"dataset": "mnist", "classes": [2, 3]},
     ["data.source.classes", "[10]", "0..9"]),
    ({"dataset": "mnist", "classes": [0, 1]}, {"dataset": "cifar100", "classes": [5, 100]},
     ["data.targets.t.classes", "[100]", "0..99"]),
    ({"dataset": "svhn", "classes": [0, 1]}, {"dataset": "svhn", "classes": [9, 10]}, ["[10]", "0..9"]),
    ({"dataset": "digits", "classes": [0, 1], "split": "train"}, {"dataset": "digits", "classes": [5, 6]},
     ["data.source.split", "digits", "'train'", "allowed: all"]),
    ({"dataset": "digits", "classes": [0, 1]}, {"dataset": "digits", "classes": [5, 6], "split": "test"},
     ["data.targets.t.split", "'test'"]),
    ({"dataset": "mnist", "classes": [0, 1], "root": "x"}, {"dataset": "mnist", "classes": [2, 3]},
     ["data.source.root", "only imagefolder"]),
    ({"dataset": "mnist", "classes": [0, 1]}, {"dataset": "mnist", "classes": [1, 2], "split": "test"},
     ["data.targets.t.classes", "[1]", "source"]),
])
def test_config_data_errors(tmp_path, source, target, fragments):
    msg = _bad(tmp_path, source, {"t": target}, image={"channels": 1, "size": 28})
    for f in fragments:
        assert f in msg, (f, msg)


def test_config_imagefolder_needs_root_and_size(tmp_path):
    msg = _bad(tmp_path, {"dataset": "imagefolder", "classes": [0, 1]}, {"t": {"dataset": "digits",
                                                                             "classes": [0, 1]}})
    assert "data.source.root" in msg and "data.image.size" in msg and "imagefolder" in msg
    msg = _bad(tmp_path, {"dataset": "digits", "classes": [0, 1]},
               {"t": {"dataset": "imagefolder", "root": "x", "classes": [0, 1], "split": "test"}},
               image={"size": 8, "channels": 1})
    assert "data.targets.t.split" in msg


def test_config_download_section(tmp_path):
    src, tgts = {"dataset": "mnist", "classes": [0, 1]}, {"t": {"dataset": "mnist", "classes": [2, 3]}}
    dl = {"checksums": {"mnist": {"train-images.gz": "a" * 64}}}
    msg = _bad(tmp_path, src, tgts, download=dl)
    assert "data.download.checksums.mnist" in msg and "train-images.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    msg = _bad(tmp_path, src, tgts, download={"checksums": {"mnist": {"train-images-idx3-ubyte.gz": "xyz"}}})
    assert "data.download.checksums.mnist.train-images-idx3-ubyte.gz" in msg
    msg = _bad(tmp_path, src, tgts, download={"mirrors": {"imagenet": "http://x/"}})
    assert "data.download.mirrors" in msg and "imagenet" in msg
    msg = _bad(tmp_path, src, tgts, download={"attempts": 0})
    assert "data.download.attempts" in msg
    msg = _bad(tmp_path, src, tgts, image={"channels": 2})
    assert "data.image.channels" in msg and "allowed values" in msg


def test_registry_consistency():
    for name, spec in REGISTRY.items():
        if spec.downloads:
            assert spec.base_url.endswith("/") and spec.num_classes == len(spec.class_names)
            for f in spec.all_files():
                assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.size > 0
        assert resolve_split(name, None, "source") in spec.splits
    assert resolve_split("mnist", None, "target") == "test" and resolve_split("digits", None, "target") == "all"
    assert effective_shape("imagefolder", {"size": 5}) == (3, 5, 5)
    assert effective_shape("svhn", {"channels": 1}) == (1, 32, 32)
    assert REGISTRY["cifar100"].class_names[99] == "worm" and REGISTRY["cifar10"].class_names[9] == "truck"
    with pytest.raises(ValueError, match="no split 'test'"):
        resolve_split("digits", "test", "target")


# ----------------------------------------------------------------------------- one real Snakemake run


def test_snakemake_builds_data_from_the_local_server(server, generated, tmp_path):
    """The real rules, from a config file: mnist source, fashion_mnist target, episodes."""
    work = tmp_path / "work"
    work.mkdir()
    cfg = make_config(tmp_path, server, generated, {"dataset": "mnist", "classes": [0, 1, 2]},
                      {"fash": {"dataset": "fashion_mnist", "classes": [0, 1, 2]}}, validate=False)
    cfg["data"]["cache_dir"] = "cache"  # relative: inside the working directory
    cfg["mlflow"] = {"tracking_uri": f"sqlite:///{work}/mlflow.db"}
    cfgfile = tmp_path / "study.yaml"
    cfgfile.write_text(yaml.safe_dump(copy.deepcopy(cfg)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PRUNESHOT_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = f"results/{cfg['study']['name']}"
    targets = [f"{res}/data/source/manifest.json", f"{res}/episodes/fash/2way_1shot.json"]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), *targets, "--snakefile", str(ROOT / "workflow" / "Snakefile"),
         "--directory", str(work), "--cores", "1", "--configfile", str(cfgfile)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    src = read_json(work / res / "data/source/manifest.json")
    assert src["dataset"] == "mnist" and src["split"] == "train" and src["classes"] == [0, 1, 2]
    assert src["splits"]["train"]["n"] + src["splits"]["val"]["n"] == int(
        np.isin(generated["mnist"].y["train"], [0, 1, 2]).sum())
    tgt = read_json(work / res / "data/target/fash/manifest.json")
    assert tgt["dataset"] == "fashion_mnist" and tgt["split"] == "test"
    assert tgt["class_names"] == ["T-shirt/top", "Trouser", "Pullover"]
    ep = read_json(work / res / "episodes/fash/2way_1shot.json")
    assert ep["pool_sha256"] == tgt["splits"]["pool"]["sha256"] and len(ep["episodes"]) == 2
    assert (work / "cache" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert sorted(p.name for p in (work / res / "data/target").iterdir()) == ["fash"]  # no staging dirs left
    assert sorted(p.name for p in (work / res / "data").iterdir()) == ["source", "target"]
    requested = sorted(set(server.state.requests))
    assert requested == sorted([f"/mnist/{n}" for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
                               + [f"/fashion_mnist/{n}" for n in ("t10k-images-idx3-ubyte.gz",
                                                                  "t10k-labels-idx1-ubyte.gz")])
