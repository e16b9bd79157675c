"""Searches and adapts on a device (issue 16): ``SearchContext.device`` / ``AdaptContext.device``.

On the CPU nothing may change: the device given explicitly ('cpu', or 'auto' without a GPU) gives
bit-identical networks, records and global RNG state to the default. That the device reaches the
computation is shown with PyTorch's ``meta`` device (tensors without data): a method that honours it
fails on a meta tensor after its model and batches went there (a forward hook sees meta inputs), where
the same call on the CPU completes. The GPU itself is checked by benchmarks/gpu_device_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pruneshot.data.splits import Split
from pruneshot.methods import AdaptContext, SearchContext, get_method
from pruneshot.models import cost as metrics
from pruneshot.models.small_cnn import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "patience": 2,
          "threads": 1}
#: Source-side methods with a loop over source batches, with short options.
SOURCE = [("slimming", {"epochs": 1, "min_steps": 6}), ("dnal", {"arch_epochs": 2, "search_steps": 2}),
          ("dap", {"steps": 8}), ("dap", {"steps": 8, "weights": "resample", "resample_every": 3}),
          ("taylor", {"batches": 3, "batch_size": 8}), ("scratch", {})]
SOURCE_IDS = ["slimming", "dnal", "dap-frozen", "dap-resample", "taylor", "scratch"]
TARGET = [("basis_scaling", {}), ("channel_scaling", {}), ("double_pruning", {}),
          ("double_pruning", {"order": "basis_first"})]
TARGET_IDS = ["basis", "channel", "double-channel-first", "double-basis-first"]
#: Device names that must mean the CPU here ('auto' only on a machine without CUDA).
CPU_NAMES = ["cpu"] + ([] if torch.cuda.is_available() else ["auto"])


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(x=torch.randn((n, 1, 8, 8), generator=gen), y=torch.randint(0, 5, (n,), generator=gen))


def _dense() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, input_size=8, widths=[8, 16, 32], num_classes=5).eval()


def _search_ctx(options: dict, **device: str) -> SearchContext:
    return SearchContext(model=_dense(), budget=0.5, metric="flops", source_train=_split(32, 1),
                         source_val=_split(10, 2), seed=11, options=dict(options), log=lambda _m: None,
                         recipe=RECIPE, **device)


def _adapt_ctx(options: dict, n_support: int, **device: str) -> AdaptContext:
    torch.manual_seed(5)
    model = SmallCNN(1, 8, [8, 16, 32], 10)
    model.reset_classifier(5, torch.Generator().manual_seed(1))
    model.eval()
    x = torch.randn(n_support, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return AdaptContext(model=model, budget=0.4, metric="params", support_x=x, support_y=torch.arange(n_support) % 5,
                        seed=7, dense_cost=float(metrics.cost(model, "params")), options=dict(options),
                        log=lambda _m: None, **device)


def _outcome(res, rng: torch.Tensor) -> dict:
    """Everything a result is: weights (and masked form), keep, info, the global RNG state after it."""
    def state(m):
        return None if m is None else {k: v.detach().clone() for k, v in m.state_dict().items()}

    return {"model": state(res.model), "masked": state(res.masked), "keep": res.keep,
            "info": json.dumps(res.info, sort_keys=True, default=str), "rng": rng}


def _assert_same(a: dict, b: dict) -> None:
    for part in ("model", "masked"):
        assert (a[part] is None) == (b[part] is None)
        if a[part] is not None:
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert a[part][k].dtype == b[part][k].dtype and torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["keep"] == b["keep"] and a["info"] == b["info"]
    assert torch.equal(a["rng"], b["rng"])


def _on_cpu_float32(res) -> None:
    for m in (res.model, res.masked):
        if m is not None:
            assert all(t.device.type == "cpu" for t in (*m.parameters(), *m.buffers()))
            assert all(p.dtype == torch.float32 for p in m.parameters())


def _run_search(name: str, options: dict, **device: str) -> dict:
    torch.manual_seed(123)
    res = get_method(name).search(_search_ctx(options, **device))
    _on_cpu_float32(res)
    return _outcome(res, torch.get_rng_state())


def _run_adapt(name: str, options: dict, n_support: int, **device: str) -> dict:
    torch.manual_seed(77)
    res = get_method(name).adapt(_adapt_ctx(options, n_support, **device))
    _on_cpu_float32(res)
    return _outcome(res, torch.get_rng_state())


# ------------------------------------------------------------------ the CPU: bit-identical to the default


@pytest.mark.parametrize(("name", "options"), SOURCE, ids=SOURCE_IDS)
def test_search_on_the_cpu_device_is_the_default_bit_for_bit(name, options):
    ref = _run_search(name, options)
    for device in CPU_NAMES:
        _assert_same(_run_search(name, options, device=device), ref)


@pytest.mark.parametrize("n_support", [25, 80], ids=["full-batch", "sampled"])
@pytest.mark.parametrize(("name", "options"), TARGET, ids=TARGET_IDS)
def test_adapt_on_the_cpu_device_is_the_default_bit_for_bit(name, options, n_support):
    ref = _run_adapt(name, options, n_support)
    for device in CPU_NAMES:
        _assert_same(_run_adapt(name, options, n_support, device=device), ref)


def test_registry_says_which_searches_use_the_device():
    uses = {n for n in ("slimming", "dnal", "dap", "taylor", "scratch", "fpgm", "l1_filter", "random", "dense",
                        "linear_probe") if get_method(n).uses_device}
    assert uses == {"slimming", "dnal", "dap", "taylor", "scratch"}


# ------------------------------------------------------------------ the device reaches the computation


class _InputDevices:
    """A global forward pre-hook recording the device of every module input (modules built during the
    call included)."""

    def __enter__(self) -> set[str]:
        self.seen: set[str] = set()

        def hook(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                self.seen.add(args[0].device.type)

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self.seen

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize(("name", "options"), SOURCE, ids=SOURCE_IDS)
def test_search_computes_on_the_given_device(name, options):
    ctx = _search_ctx(options, device="meta")
    with _InputDevices() as seen, pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        get_method(name).search(ctx)
    if name != "slimming":  # slimming fails earlier, reading its moved model's gammas back to the CPU
        assert "meta" in seen


def test_slimming_fine_tune_runs_on_the_model_device():
    from pruneshot.methods.slimming import sparsity_finetune

    model = _dense().to("meta")
    with _InputDevices() as seen, pytest.raises(RuntimeError, match="meta"):
        sparsity_finetune(model, _split(32, 1), l1=0.01, epochs=1, lr=0.01, momentum=0.9, batch_size=8, seed=0)
    assert "meta" in seen


@pytest.mark.parametrize(("name", "options"), TARGET, ids=TARGET_IDS)
def test_adapt_computes_on_the_given_device(name, options):
    ctx = _adapt_ctx(options, 25, device="meta")
    with _InputDevices() as seen, pytest.raises(RuntimeError, match="meta"):
        get_method(name).adapt(ctx)
    assert "meta" in seen
    assert ctx.support_x.device.type == "cpu"  # the caller's tensors are not moved


# ------------------------------------------------------------------ the stage records the device


def _job(rule: str):
    from pruneshot.stages.job import Job

    return Job(rule=rule, wildcards={}, config={}, log_path=None)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from pruneshot.config import load_config
    from pruneshot.stages.data import prepare_source
    from pruneshot.stages.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("device")
    cfg = load_config(ROOT / "tests/configs/tiny.yaml")
    cfg["data"]["cache_dir"] = str(tmp / "cache")
    cfg["pretrain"]["epochs"] = 1
    prepare_source(cfg, tmp / "source", _job("prepare_source"))
    pre = tmp / "pretrain"
    pretrain(cfg, 0, tmp / "source/manifest.json", pre / "model.safetensors", pre / "arch.json",
             pre / "metrics.json", _job("pretrain"))
    return cfg, tmp


def _stage_search(cfg: dict, tmp: Path, method: str, tag: str) -> dict:
    from pruneshot.stages.search import search

    pre, out = tmp / "pretrain", tmp / "search" / method / tag
    return search(cfg, method, 0.5, 0, tmp / "source/manifest.json", pre / "model.safetensors", pre / "arch.json",
                  pre / "metrics.json", out / "model.safetensors", out / "arch.json", out / "record.json",
                  _job("search"))


@pytest.mark.parametrize("method", ["taylor", "l1_filter"])
def test_search_stage_records_the_device_used(pretrained, method):
    cfg, tmp = pretrained
    records = {}
    for device in CPU_NAMES:
        records[device] = _stage_search({**cfg, "pretrain": {**cfg["pretrain"], "device": device}}, tmp, method,
                                        device)
        assert records[device]["status"] == "ok" and records[device]["search_device"] == "cpu"
    assert len({r["weights_sha256"] for r in records.values()}) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_search_stage_refuses_an_absent_gpu_before_any_work(pretrained):
    cfg, tmp = pretrained
    with pytest.raises(ValueError, match=r"pretrain\.device is 'cuda' but no CUDA device is usable"):
        _stage_search({**cfg, "pretrain": {**cfg["pretrain"], "device": "cuda"}}, tmp, "taylor", "cuda")
    assert not (tmp / "search" / "taylor" / "cuda" / "record.json").exists()
