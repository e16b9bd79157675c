"""The device-resident input pipeline (pruneshot.data.pipeline), on the CPU: the augmentation is exactly the
documented transform, its draws have the documented distribution, batches are fixed by the seed,
normalisation is load_split's, and a requested but absent GPU is a clear error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pruneshot.data import prepare as data
from pruneshot.data.pipeline import (
    Augment,
    BatchSource,
    autocast,
    crop_flip,
    draw_augmentation,
    load_raw_split,
    resolve_device,
    zero_level,
)
from pruneshot.data.splits import load_split
from pruneshot.io import read_json

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


def naive_crop_flip(x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None, pad: int,
                    fill: float = 0.0) -> torch.Tensor:
    """The documented transform, one image at a time: pad, take the H x W window at (dy, dx), mirror."""
    _, _, h, w = x.shape
    out = []
    for i in range(len(x)):
        img = x[i]
        if offsets is not None:
            padded = torch.full((img.shape[0], h + 2 * pad, w + 2 * pad), fill, dtype=img.dtype)
            padded[:, pad : pad + h, pad : pad + w] = img
            dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
            img = padded[:, dy : dy + h, dx : dx + w]
        if flips is not None and bool(flips[i]):
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    data.prepare_source(data.load_raw("digits"), [0, 1, 2], 0.2, 3, out)
    return out / "manifest.json"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize(("pad", "use_offsets", "use_flips"), [(4, True, True), (2, True, False), (0, False, True),
                                                                (1, True, True)])
def test_vectorised_crop_flip_equals_the_per_image_reference(dtype, pad, use_offsets, use_flips):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (13, 3, 7, 5), generator=gen).to(dtype)  # H != W: rows and cols cannot swap
    offsets = torch.randint(0, 2 * pad + 1, (13, 2), generator=gen) if use_offsets else None
    flips = torch.randint(0, 2, (13,), generator=gen).bool() if use_flips else None
    fill = 0 if dtype == torch.uint8 else -1.25
    got = crop_flip(x, offsets, flips, pad, fill=fill)
    want = naive_crop_flip(x, offsets, flips, pad, fill=fill)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)
    if use_offsets:  # the corner offsets bring padding in, so the test sees the fill value
        corner = crop_flip(x[:1], torch.tensor([[0, 0]]), None, pad, fill=fill)
        assert (corner[0, :, :pad, :] == fill).all() and (corner[0, :, :, :pad] == fill).all()
        assert torch.equal(corner[0, :, pad:, pad:], x[0, :, : 7 - pad, : 5 - pad])


def test_centre_offset_without_flip_is_identity_and_flip_mirrors():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    centre = torch.full((2, 2), 3)
    assert torch.equal(crop_flip(x, centre, torch.tensor([False, False]), 3), x)
    flipped = crop_flip(x, None, torch.tensor([True, False]), 0)
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    assert crop_flip(x, None, None, 0) is x


def test_offsets_are_uniform_on_0_to_2pad_and_flips_have_rate_one_half():
    gen = torch.Generator().manual_seed(1)
    pad, n = 4, 90_000
    offsets, flips = draw_augmentation(n, Augment(crop_padding=pad, flip=True), gen)
    assert offsets.shape == (n, 2) and offsets.dtype == torch.int64 and flips.dtype == torch.bool
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # nothing outside [0, 2 * pad]
        expected = n / (2 * pad + 1)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 30.0, counts  # 8 dof: p < 2e-4 under uniformity
    # dy and dx are independent: the joint histogram is uniform on the 81 cells
    joint = torch.bincount(offsets[:, 0] * (2 * pad + 1) + offsets[:, 1], minlength=(2 * pad + 1) ** 2)
    assert joint.min() > 0.8 * n / 81 and joint.max() < 1.2 * n / 81
    assert abs(flips.float().mean().item() - 0.5) < 0.01
    assert draw_augmentation(5, Augment(), gen) == (None, None)
    off, fl = draw_augmentation(5, Augment(crop_padding=0, flip=True), gen)
    assert off is None and fl is not None


def test_normalisation_equals_load_split_bit_for_bit(digits):
    norm = read_json(digits)["normalization"]
    for split in ("train", "val"):
        ref = load_split(digits, split, norm)
        raw = load_raw_split(digits, split)
        assert raw.x.dtype == torch.uint8
        src = BatchSource.from_raw(raw, norm)
        xs, ys = zip(*src.epoch(50), strict=True)  # no generator: in order, never augmented
        assert torch.equal(torch.cat(xs), ref.x)
        assert torch.equal(torch.cat(ys), ref.y)
    # a level-0 pixel's normalised value is the crop padding of float images
    assert zero_level(raw.max_value, norm) == float((torch.zeros(()) / raw.max_value - norm["mean"]) / norm["std"])


def test_augmented_batches_are_the_documented_transform_of_load_split(digits):
    """Pipeline batch = (permutation, offsets, flips drawn in that order from the seed) applied to
    load_split's float images with zero-pixel padding; crop-then-normalise equals normalise-then-crop."""
    norm = read_json(digits)["normalization"]
    ref = load_split(digits, "train", norm)
    raw = load_raw_split(digits, "train")
    aug = Augment(crop_padding=2, flip=True)
    src = BatchSource.from_raw(raw, norm)
    batches = list(src.epoch(64, torch.Generator().manual_seed(7), aug))
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(len(ref), generator=gen)
    offsets, flips = draw_augmentation(len(ref), aug, gen)
    fill = zero_level(raw.max_value, norm)
    for k, (xb, yb) in enumerate(batches):
        sl = slice(64 * k, 64 * (k + 1))
        idx = perm[sl]
        want = naive_crop_flip(ref.x[idx], offsets[sl], flips[sl], 2, fill=fill)
        assert torch.equal(xb, want), k
        assert torch.equal(yb, ref.y[idx])
    assert sum(len(y) for _, y in batches) == len(ref)
    # the float-image path (transfer) gives the same batches
    fsrc = BatchSource.from_split(ref, fill=fill)
    for (xa, ya), (xb, yb) in zip(batches, fsrc.epoch(64, torch.Generator().manual_seed(7), aug), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_seed_same_batches_other_seed_other_batches(digits):
    norm = read_json(digits)["normalization"]
    src = BatchSource.from_raw(load_raw_split(digits, "train"), norm)
    aug = Augment(crop_padding=2, flip=True)

    def stream(seed: int, augment: Augment = aug) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [b for _ in range(2) for b in src.epoch(32, g, augment)]  # two epochs from one generator

    a, b, c = stream(3), stream(3), stream(4)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=True))
    assert not torch.equal(a[0][0], a[len(a) // 2][0])  # the second epoch is a new permutation
    # augmentation on changes the first epoch's images, not its permutation (drawn first; later
    # epochs' permutations differ, as the augmentation draws advance the generator)
    plain = stream(3, Augment())
    first = len(a) // 2
    assert all(torch.equal(ya, yp) for (_, ya), (_, yp) in zip(a[:first], plain[:first], strict=True))
    assert not all(torch.equal(xa, xp) for (xa, _), (xp, _) in zip(a[:first], plain[:first], strict=True))


def test_channels_last_batches_have_the_same_values():
    x = torch.randint(0, 17, (10, 3, 6, 6), dtype=torch.uint8)
    y = torch.arange(10)
    a = BatchSource(x, y, max_value=16, mean=0.3, std=0.2)
    b = BatchSource(x, y, max_value=16, mean=0.3, std=0.2, channels_last=True)
    (xa, _), (xb, _) = next(a.epoch(10)), next(b.epoch(10))
    assert xb.is_contiguous(memory_format=torch.channels_last) and torch.equal(xa, xb)
    with pytest.raises(ValueError, match="max_value"):
        BatchSource(x, y)
    with pytest.raises(ValueError, match="max_value"):
        BatchSource(x.float(), y, max_value=16)


def test_load_raw_split_verifies_the_sha256(digits, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(digits.parent, copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["splits"]["val"]["sha256"] = "0" * 64
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match"):
        load_raw_split(copy_dir / "manifest.json", "val")


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"pretrain\.device is 'cuda' but no CUDA device is usable.*'auto' or 'cpu'"):
        resolve_device("cuda", "pretrain.device")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_amp_is_a_no_op_on_the_cpu():
    lin = torch.nn.Linear(4, 2)
    with autocast(torch.device("cpu"), "bf16"):
        assert lin(torch.randn(3, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="amp"):
        autocast(torch.device("cpu"), "fp8")


def test_throughput_benchmark_runs_small_and_writes_its_json(tmp_path):
    spec = importlib.util.spec_from_file_location("training_throughput", ROOT / "benchmarks/training_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tt.json"
    assert mod.main(["--backbone", "small_cnn", "--widths", "8", "16", "--n", "128", "--batch-size", "32",
                     "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    ips = rec["images_per_s"]
    assert ips["pipeline"] > 0 and ips["prestaged"] > 0 and ips["pipeline_only"] > 0
    assert rec["overhead_ratio_prestaged_over_pipeline"] == pytest.approx(ips["prestaged"] / ips["pipeline"],
                                                                          rel=1e-2)
    assert rec["device_name"].startswith("cpu:") and rec["amp"] == "none" and rec["channels_last"] is False
    assert rec["batch_size"] == 32 and rec["warmup"] == 1 and rec["steps"] == 2
