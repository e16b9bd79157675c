"""Dataset preparation on the real scikit-learn digits: shards, manifests, splits, integrity."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pruneshot.data import prepare as data
from pruneshot.data.checks import DATASET_CLASS_SIZES
from pruneshot.data.splits import load_split
from pruneshot.io import load_tensors, read_json

# Deliberately not in ascending order: labels must follow the configured order.
SOURCE_CLASSES = [3, 0, 4, 1, 2]
TARGET_CLASSES = [9, 5, 7]
VAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def raw():
    return data.load_raw("digits")


@pytest.fixture(scope="module")
def source_dir(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    manifest = data.prepare_source(raw, SOURCE_CLASSES, VAL_FRACTION, seed=42, out_dir=out)
    return out, manifest


@pytest.fixture(scope="module")
def target_dir(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("target")
    manifest = data.prepare_target(raw, TARGET_CLASSES, out_dir=out)
    return out, manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(x: np.ndarray) -> Counter:
    """Multiset of images as bytes."""
    return Counter(img.tobytes() for img in np.ascontiguousarray(x))


def test_raw_digits(raw):
    assert raw.x.dtype == np.uint8
    assert raw.x.shape == (1797, 1, 8, 8)
    assert raw.y.shape == (1797,)
    assert raw.max_value == 16
    assert raw.x.max() == 16
    assert raw.x.min() == 0
    # the per-class sizes the config checks rely on are those of the real dataset
    counts = Counter(raw.y.tolist())
    assert dict(counts) == DATASET_CLASS_SIZES["digits"]


def test_load_raw_unknown_dataset():
    with pytest.raises(ValueError, match="digits"):
        data.load_raw("imagenet")


@pytest.mark.parametrize("which", ["source", "target"])
def test_manifest_sha256_matches_files(which, source_dir, target_dir):
    out, manifest = source_dir if which == "source" else target_dir
    on_disk = read_json(out / "manifest.json")
    assert on_disk == manifest
    expected = {"train", "val"} if which == "source" else {"pool"}
    assert set(manifest["splits"]) == expected
    for entry in manifest["splits"].values():
        path = out / entry["file"]
        assert path.is_file()
        assert entry["sha256"] == _sha256(path)
        assert entry["n"] == len(load_tensors(path)["y"])


def test_source_train_val_disjoint_and_complete(raw, source_dir):
    out, _ = source_dir
    train = load_tensors(out / "train.safetensors")
    val = load_tensors(out / "val.safetensors")
    selected = np.isin(raw.y, SOURCE_CLASSES)

    # together the two splits hold every source image exactly once (as a multiset of
    # (image, label) pairs), so no image is in both and none is lost
    def pairs(x, y):
        return Counter((img.tobytes(), int(lab)) for img, lab in zip(np.ascontiguousarray(x), y, strict=True))

    combined = pairs(train["x"].numpy(), train["orig_y"].numpy()) + pairs(val["x"].numpy(), val["orig_y"].numpy())
    assert combined == pairs(raw.x[selected], raw.y[selected])
    assert len(train["y"]) + len(val["y"]) == int(selected.sum())
    # no image (as a sample) appears in both splits unless the raw data holds it twice
    raw_counts = _rows(raw.x[selected])
    shared = set(_rows(train["x"].numpy())) & set(_rows(val["x"].numpy()))
    assert all(raw_counts[s] > 1 for s in shared)
    assert train["x"].dtype == torch.uint8
    assert tuple(train["x"].shape[1:]) == (1, 8, 8)


def test_source_split_is_stratified(source_dir):
    out, manifest = source_dir
    val_y = load_tensors(out / "val.safetensors")["orig_y"].numpy()
    train_y = load_tensors(out / "train.safetensors")["orig_y"].numpy()
    for c in SOURCE_CLASSES:
        n = DATASET_CLASS_SIZES["digits"][c]
        n_val = int((val_y == c).sum())
        assert n_val + int((train_y == c).sum()) == n
        # within rounding of val_fraction of each class: e.g. class 3 has 183 -> 37 (36.6 rounded)
        assert abs(n_val - VAL_FRACTION * n) <= 0.5
    assert set(val_y.tolist()) == set(SOURCE_CLASSES)
    assert manifest["val_fraction"] == VAL_FRACTION
    assert manifest["classes"] == SOURCE_CLASSES


def test_labels_reindexed_in_configured_order(source_dir, target_dir):
    for out, classes, files in (
        (source_dir[0], SOURCE_CLASSES, ["train", "val"]),
        (target_dir[0], TARGET_CLASSES, ["pool"]),
    ):
        for f in files:
            t = load_tensors(out / f"{f}.safetensors")
            y, orig = t["y"].numpy(), t["orig_y"].numpy()
            assert t["y"].dtype == torch.int64
            assert set(y.tolist()) == set(range(len(classes)))
            assert [classes[v] for v in y.tolist()] == orig.tolist()


def test_target_pool_holds_every_target_image(raw, target_dir):
    out, manifest = target_dir
    pool = load_tensors(out / "pool.safetensors")
    selected = np.isin(raw.y, TARGET_CLASSES)
    assert _rows(pool["x"].numpy()) == _rows(raw.x[selected])
    assert manifest["class_counts"] == {str(c): DATASET_CLASS_SIZES["digits"][c] for c in TARGET_CLASSES}
    assert manifest["role"] == "target"
    assert manifest["classes"] == TARGET_CLASSES


def test_split_depends_on_seed_only(raw, source_dir, tmp_path):
    _, manifest = source_dir
    again = data.prepare_source(raw, SOURCE_CLASSES, VAL_FRACTION, seed=42, out_dir=tmp_path / "a")
    other = data.prepare_source(raw, SOURCE_CLASSES, VAL_FRACTION, seed=43, out_dir=tmp_path / "b")
    assert again["splits"] == manifest["splits"]
    assert other["splits"]["val"]["sha256"] != manifest["splits"]["val"]["sha256"]


def test_load_split_normalises(source_dir):
    out, manifest = source_dir
    norm = manifest["normalization"]
    train = load_split(out / "manifest.json", "train", norm)
    raw_train = load_tensors(out / "train.safetensors")
    assert train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64
    assert len(train) == manifest["splits"]["train"]["n"]
    assert torch.equal(train.y, raw_train["y"])
    # normalisation statistics are those of the training split scaled to [0, 1]
    scaled = raw_train["x"].double() / 16
    assert norm["mean"] == pytest.approx(scaled.mean().item(), rel=1e-9)
    assert norm["std"] == pytest.approx(scaled.std(unbiased=False).item(), rel=1e-9)
    assert train.x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert train.x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    expected = (raw_train["x"].float() / 16 - norm["mean"]) / norm["std"]
    assert torch.allclose(train.x, expected)


@pytest.mark.parametrize("where", [0.5, 0.999])
def test_load_split_detects_a_flipped_byte(raw, tmp_path, where):
    out = tmp_path / "src"
    manifest = data.prepare_source(raw, SOURCE_CLASSES, VAL_FRACTION, seed=1, out_dir=out)
    path = out / manifest["splits"]["val"]["file"]
    blob = bytearray(path.read_bytes())
    pos = int(where * (len(blob) - 1))
    blob[pos] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError) as err:
        load_split(out / "manifest.json", "val", manifest["normalization"])
    assert "val.safetensors" in str(err.value)
    assert "sha256" in str(err.value)
    # the intact split still loads
    load_split(out / "manifest.json", "train", manifest["normalization"])


def test_prepare_is_atomic_on_failure(raw, tmp_path, monkeypatch):
    """A failure while writing leaves neither the output dir nor a staging dir behind."""

    def broken(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(data, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        data.prepare_source(raw, SOURCE_CLASSES, VAL_FRACTION, seed=1, out_dir=tmp_path / "src")
    with pytest.raises(OSError, match="disk full"):
        data.prepare_target(raw, TARGET_CLASSES, out_dir=tmp_path / "tgt")
    assert list(tmp_path.iterdir()) == []


def test_prepare_manifest_records_provenance(raw, source_dir, target_dir):
    for _, manifest in (source_dir, target_dir):
        assert manifest["dataset"] == "digits" and manifest["split"] == "all"
        assert manifest["native_shape"] == manifest["image_shape"] == [1, 8, 8]
        assert manifest["conversion"] == {"channels": None, "size": None}
        (entry,) = manifest["source_files"]
        assert entry["file"] == "sklearn.datasets.load_digits" and len(entry["sha256"]) == 64
    assert source_dir[1]["class_names"] == [str(c) for c in SOURCE_CLASSES]


def test_unknown_class_is_an_error(raw, tmp_path):
    with pytest.raises(data.DatasetError, match=r"digits.*\[11\] have no images"):
        data.prepare_target(raw, [5, 11], out_dir=tmp_path / "t")
    assert list(tmp_path.iterdir()) == []
