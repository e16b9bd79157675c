"""The search and transfer stages without Snakemake: every registered method on real digits data,
tiny sizes. Budget 1 must reproduce the dense method exactly; target-side methods prune per
episode; the reinit arm starts from fresh weights; arms a method does not have are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pruneshot.config import load_config
from pruneshot.io import read_json
from pruneshot.methods import available, get_method
from pruneshot.stages import job as stages

ROOT = Path(__file__).resolve().parents[1]
SHOTS = 2


def _job(rule: str, **wildcards: str) -> stages.Job:
    return stages.Job(rule=rule, wildcards=wildcards, config={}, log_path=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Data, episodes and a pretrained tiny backbone, made by the real stage functions."""
    tmp = tmp_path_factory.mktemp("stages")
    cfg = load_config(ROOT / "tests/configs/tiny.yaml")
    cfg["episodes"]["count"] = 3
    cfg["transfer"]["steps"] = 4
    cfg["data"]["cache_dir"] = str(tmp / "cache")
    src, tgt = tmp / "source", tmp / "target"
    stages.prepare_source(cfg, src, _job("prepare_source"))
    stages.prepare_target(cfg, "digits_5to9", tgt, _job("prepare_target"))
    episodes = tmp / "episodes.json"
    stages.make_episodes(cfg, "digits_5to9", 5, SHOTS, tgt / "manifest.json", episodes, _job("make_episodes"))
    pre = tmp / "pretrain"
    stages.pretrain(cfg, 0, src / "manifest.json", pre / "model.safetensors", pre / "arch.json",
                    pre / "metrics.json", _job("pretrain"))
    return {"cfg": cfg, "tmp": tmp, "src": src, "tgt": tgt, "episodes": episodes, "pre": pre}


def _search(world: dict, method: str, budget: float) -> Path:
    out = world["tmp"] / "search" / method / str(budget)
    if not (out / "record.json").exists():
        pre = world["pre"]
        stages.search(world["cfg"], method, budget, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                      pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                      out / "record.json", _job("search", method=method))
    return out


def _transfer_job(world: dict, method: str, budget: float, arms: list[str], cfg: dict | None = None) -> dict:
    s = _search(world, method, budget)
    out = world["tmp"] / "transfer" / f"{method}_{budget}_{'-'.join(arms)}.json"
    return stages.transfer(cfg or world["cfg"], method, arms, SHOTS, "digits_5to9", 0, s / "model.safetensors",
                           s / "arch.json", s / "record.json", world["src"] / "manifest.json",
                           world["tgt"] / "manifest.json", world["episodes"], out, _job("transfer", method=method))


def _transfer(world: dict, method: str, budget: float, arm: str) -> dict:
    """One arm's results merged with the job's record."""
    rec = _transfer_job(world, method, budget, [arm])
    return {**rec, **rec["arms"][arm], "arm": arm}


@pytest.mark.parametrize("method", [m for m in available() if m != "linear_probe"])
def test_budget_one_transfers_exactly_like_dense(world, method):
    """At budget 1 a method keeps the dense network, so the paired episodes give identical accuracies."""
    dense = _transfer(world, "dense", 1.0, "finetune")
    rec = _transfer(world, method, 1.0, "finetune")
    assert rec["episode_accuracies"] == dense["episode_accuracies"]
    assert rec["finetune_seeds"] == dense["finetune_seeds"]
    srec = read_json(_search(world, method, 1.0) / "record.json")
    dense_rec = read_json(_search(world, "dense", 1.0) / "record.json")
    assert (srec["achieved_params"], srec["achieved_flops"]) == (dense_rec["achieved_params"],
                                                                  dense_rec["achieved_flops"])
    if get_method(method).side == "target":
        assert all(a["params"] == rec["adapted"][0]["params"] for a in rec["adapted"])
        assert rec["achieved"]["achieved_ratio"] == pytest.approx(1.0)


def test_arms_share_the_head_seed_but_not_the_training_seed(world):
    ft = _transfer(world, "random", 0.5, "finetune")
    lp = _transfer(world, "random", 0.5, "linear_probe")
    assert ft["head_seeds"] == lp["head_seeds"]
    assert ft["finetune_seeds"] != lp["finetune_seeds"]


def test_one_job_with_several_arms_equals_one_job_per_arm(world):
    """Running the arms together (one job) gives each arm exactly what it gets alone."""
    both = _transfer_job(world, "l1_filter", 0.5, ["finetune", "reinit"])
    for arm in ("finetune", "reinit"):
        alone = _transfer(world, "l1_filter", 0.5, arm)
        assert both["arms"][arm]["episode_accuracies"] == alone["episode_accuracies"]
        assert both["arms"][arm]["finetune_seeds"] == alone["finetune_seeds"]


@pytest.mark.parametrize("method", [m for m in available() if get_method(m).side == "target"])
def test_target_side_arms_share_the_per_episode_pruned_network(world, method):
    both = _transfer_job(world, method, 0.5, ["finetune", "linear_probe"])
    alone = _transfer(world, method, 0.5, "linear_probe")
    assert [a["spec"] for a in both["adapted"]] == [a["spec"] for a in alone["adapted"]]
    assert both["arms"]["linear_probe"]["episode_accuracies"] == alone["episode_accuracies"]


def test_reinit_arm_starts_from_fresh_weights(world):
    ft = _transfer(world, "l1_filter", 0.5, "finetune")
    ri = _transfer(world, "l1_filter", 0.5, "reinit")
    assert ri["arm"] == "reinit"
    assert ri["episode_accuracies"] != ft["episode_accuracies"]
    again = _transfer(world, "l1_filter", 0.5, "reinit")
    assert again["episode_accuracies"] == ri["episode_accuracies"]


def test_fresh_weights_are_seeded_and_differ_from_pretrained(world):
    import torch

    spec = read_json(world["pre"] / "arch.json")
    a, b = stages._fresh_weights(spec, 7), stages._fresh_weights(spec, 7)
    c = stages._fresh_weights(spec, 8)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.features[0][0].weight, c.features[0][0].weight)
    state = torch.random.get_rng_state()
    stages._fresh_weights(spec, 9)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_arms_a_method_lacks_are_refused(world):
    with pytest.raises(ValueError, match="reinit"):
        _transfer(world, "linear_probe", 1.0, "reinit")
    targets = [m for m in available() if get_method(m).side == "target"]
    for m in targets:
        assert "reinit" not in get_method(m).arms(["finetune", "reinit"])


@pytest.mark.parametrize("method", [m for m in available() if get_method(m).side == "target"])
def test_target_side_methods_prune_every_episode(world, method):
    rec = _transfer(world, method, 0.5, "finetune")
    assert len(rec["adapted"]) == world["cfg"]["episodes"]["count"]
    assert len(set(rec["adapt_seeds"])) == len(rec["adapt_seeds"])
    for a in rec["adapted"]:
        assert a["achieved_ratio"] <= 0.5 + 0.02
        assert a["adapt_seconds"] > 0
    srec = read_json(_search(world, method, 0.5) / "record.json")
    assert srec["side"] == "target"
    assert srec["params_ratio"] == 1.0  # the source side hands on the dense network
    # the timed network is a per-episode one
    prof = stages.profile({**world["cfg"], "profile": {"batch_sizes": [1], "warmup": 0, "repeats": 2,
                                                       "threads": 1}},
                          _search(world, method, 0.5) / "model.safetensors",
                          _search(world, method, 0.5) / "arch.json", world["tmp"] / f"profile_{method}.json",
                          _job("profile"), adapted=world["tmp"] / "transfer" / f"{method}_0.5_finetune.json")
    # the cost recorded per episode is the cost of the network it describes
    from pruneshot.models.base import build_model
    from pruneshot.models.cost import cost

    for a in rec["adapted"]:
        net = build_model(a["spec"])
        assert (cost(net, "params"), cost(net, "flops")) == (a["params"], a["flops"])
    assert prof["network"]["episode"] in {a["episode"] for a in rec["adapted"]}


def test_method_options_nest_the_sections_a_method_builds_on(world):
    cfg = copy.deepcopy(world["cfg"])
    for name in available():
        method = get_method(name)
        opts = stages.method_options(cfg, method)
        for section in method.option_sections:
            assert opts[section] == cfg.get(section, {})
        own = cfg.get(name)
        if isinstance(own, dict):
            assert {k: opts[k] for k in own} == own


def test_pretrained_weights_do_not_depend_on_the_cores_snakemake_grants(world):
    """The job's core reservation (Snakemake scales it down under --cores 1) must not change the weights."""
    pre = world["pre"]
    other = world["tmp"] / "pretrain_more_cores"
    job = stages.Job(rule="pretrain", wildcards={}, config={}, threads=3)
    rec = stages.pretrain(world["cfg"], 0, world["src"] / "manifest.json", other / "model.safetensors",
                          other / "arch.json", other / "metrics.json", job)
    assert rec["weights_sha256"] == read_json(pre / "metrics.json")["weights_sha256"]


NO_GPU = not __import__("torch").cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_cuda_requested_without_a_gpu_fails_before_any_work(world):
    cfg = copy.deepcopy(world["cfg"])
    cfg["pretrain"]["device"] = "cuda"
    out = world["tmp"] / "pretrain_cuda"
    with pytest.raises(ValueError, match=r"pretrain\.device is 'cuda' but no CUDA device is usable"):
        stages.pretrain(cfg, 0, world["src"] / "manifest.json", out / "model.safetensors", out / "arch.json",
                        out / "metrics.json", _job("pretrain"))
    assert not out.exists()
    cfg = copy.deepcopy(world["cfg"])
    cfg["transfer"]["device"] = "cuda"
    with pytest.raises(ValueError, match=r"transfer\.device is 'cuda'"):
        _transfer_job(world, "dense", 1.0, ["finetune"], cfg=cfg)


def test_pretrain_and_transfer_record_the_device(world):
    rec = read_json(world["pre"] / "metrics.json")
    assert rec["applied"]["device"] == "cpu" and rec["applied"]["device_name"].startswith("cpu:")
    assert rec["applied"]["amp"] == "none" and rec["applied"]["channels_last"] is False
    assert rec["provenance"]["device"] == rec["applied"]["device_name"]
    tr = _transfer_job(world, "dense", 1.0, ["finetune"])
    assert tr["device"]["device"] == "cpu" and tr["device"]["name"].startswith("cpu:")
    # an explicit cpu is what auto picks here: the same numbers
    cfg = copy.deepcopy(world["cfg"])
    cfg["transfer"]["device"] = "cpu"
    explicit = _transfer_job(world, "dense", 1.0, ["finetune"], cfg=cfg)
    assert explicit["arms"]["finetune"]["episode_accuracies"] == tr["arms"]["finetune"]["episode_accuracies"]


def test_transfer_crop_flip_is_seeded_and_changes_the_fine_tune(world):
    cfg = copy.deepcopy(world["cfg"])
    cfg["transfer"]["augment"] = "crop_flip"
    cfg["transfer"]["crop_padding"] = 2
    cfg["transfer"]["steps"] = 8
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg["transfer"]["augment"] = "none"
    a = _transfer_job(world, "dense", 1.0, ["finetune"], cfg=cfg)
    b = _transfer_job(world, "dense", 1.0, ["finetune"], cfg=cfg)
    plain = _transfer_job(world, "dense", 1.0, ["finetune"], cfg=plain_cfg)
    assert a["arms"]["finetune"]["episode_accuracies"] == b["arms"]["finetune"]["episode_accuracies"]
    assert a["device"]["augment"] == "crop_flip"
    assert a["arms"]["finetune"]["finetune_seeds"] == plain["arms"]["finetune"]["finetune_seeds"]
    assert a["arms"]["finetune"]["episode_accuracies"] != plain["arms"]["finetune"]["episode_accuracies"]


def test_profile_records_the_cpu_and_marks_an_absent_cuda(world):
    import math

    s = _search(world, "l1_filter", 0.5)
    cfg = {**world["cfg"], "profile": {"batch_sizes": [1, 4], "devices": ["cpu", "cuda"], "warmup": 0,
                                       "repeats": 2, "threads": 1}}
    prof = stages.profile(cfg, s / "model.safetensors", s / "arch.json", world["tmp"] / "profile_l1.json",
                          _job("profile"))
    assert read_json(world["tmp"] / "profile_l1.json") == prof
    cpu = prof["devices"]["cpu"]
    assert cpu["present"] and cpu["name"].startswith("cpu:") and cpu["name"] == prof["device"]
    assert set(cpu["latency"]) == {"1", "4"} and prof["latency"] == cpu["latency"]
    assert prof["batch_sizes"] == [1, 4] and prof["threads"] == 1
    cols = stages.latency_columns(prof)
    assert cols["latency_device"] == cpu["name"] and cols["latency_ms_b4"] == cpu["latency"]["4"]["median_ms"]
    if NO_GPU:
        cuda = prof["devices"]["cuda"]
        assert cuda["present"] is False and "cuda" not in cuda.get("name", "") and cuda["reason"]
        assert cols["latency_cuda_device"] == "" and math.isnan(cols["latency_cuda_ms_b1"])
        assert math.isnan(cols["latency_cuda_ms_b4"])
    else:
        assert prof["devices"]["cuda"]["name"].startswith("cuda:")
        assert cols["latency_cuda_ms_b1"] > 0
    # only cuda asked for: the CPU columns are empty, the table keeps its shape
    only = stages.profile({**cfg, "profile": {**cfg["profile"], "devices": ["cuda"]}}, s / "model.safetensors",
                          s / "arch.json", world["tmp"] / "profile_cuda_only.json", _job("profile"))
    assert "cpu" not in only["devices"] and only["latency"] == {} and only["device"] is None
    cols = stages.latency_columns(only)
    assert set(cols) == {"latency_device", "latency_dtype", "latency_ms_b1", "latency_ms_b4", "latency_cuda_device",
                         "latency_cuda_ms_b1", "latency_cuda_ms_b4"}
    assert math.isnan(cols["latency_ms_b1"])
    # a record written before devices were timed still aggregates
    old = {"device": "cpu:x86_64", "dtype": "float32", "threads": 1,
           "latency": {"1": {"median_ms": 0.5}, "64": {"median_ms": 2.0}}}
    cols = stages.latency_columns(old)
    assert cols["latency_ms_b64"] == 2.0 and math.isnan(cols["latency_cuda_ms_b64"])


# ------------------------------------------------------------------ failed cells


def _fresh_search(world: dict, method: str, budget: float, tag: str) -> Path:
    out = world["tmp"] / f"search_{tag}" / method / str(budget)
    pre = world["pre"]
    stages.search(world["cfg"], method, budget, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                  pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                  out / "record.json", _job("search", method=method))
    return out


def _cell(world: dict, method: str, budget: float, s: Path, tag: str, arm: str = "finetune") -> dict:
    cfg = {**world["cfg"], "profile": {**world["cfg"]["profile"], "batch_sizes": [1], "warmup": 0, "repeats": 2}}
    tr = world["tmp"] / f"transfer_{tag}" / f"{method}.json"
    rec = stages.transfer(cfg, method, [arm], SHOTS, "digits_5to9", 0, s / "model.safetensors", s / "arch.json",
                          s / "record.json", world["src"] / "manifest.json", world["tgt"] / "manifest.json",
                          world["episodes"], tr, _job("transfer", method=method))
    prof = world["tmp"] / f"profile_{tag}" / f"{method}.json"
    adapted = tr if get_method(method).side == "target" else None
    stages.profile(cfg, s / "model.safetensors", s / "arch.json", prof, _job("profile", method=method),
                   adapted=adapted)
    return {"transfer": tr, "search": s / "record.json", "profile": prof, "pretrain": world["pre"] / "metrics.json",
            "arm": arm, "record": rec}


def test_a_failing_method_becomes_a_failed_row_and_the_others_are_unaffected(world, monkeypatch):
    import json

    import pandas as pd

    monkeypatch.setenv("PRUNESHOT_INJECT_FAILURE", "search:l1_filter,transfer:channel_scaling")
    bad_search = _fresh_search(world, "l1_filter", 0.5, "fail")
    srec = read_json(bad_search / "record.json")
    assert srec["status"] == "failed" and "injected failure (search:l1_filter" in srec["error"]
    assert read_json(bad_search / "arch.json")["failed"] is True
    cells = [_cell(world, "l1_filter", 0.5, bad_search, "fail")]
    assert cells[0]["record"]["status"] == "failed"
    assert cells[0]["record"]["error"].startswith("search failed: RuntimeError: injected failure")
    assert read_json(cells[0]["profile"])["status"] == "failed"
    # a target-side method failing inside the transfer job, and a healthy method next to both
    cells.append(_cell(world, "channel_scaling", 0.5, _fresh_search(world, "channel_scaling", 0.5, "fail"), "fail"))
    assert cells[1]["record"]["status"] == "failed" and "transfer:channel_scaling" in cells[1]["record"]["error"]
    monkeypatch.delenv("PRUNESHOT_INJECT_FAILURE")
    cells.append(_cell(world, "random", 0.5, _fresh_search(world, "random", 0.5, "ok"), "ok"))
    assert cells[2]["record"]["status"] == "ok"
    out = world["tmp"] / "agg_fail"
    rows = stages.aggregate(world["cfg"], cells, world["src"] / "manifest.json",
                            {"digits_5to9": world["tgt"] / "manifest.json"}, out / "results.csv",
                            out / "episodes.csv", out / "metrics.json", _job("aggregate"))
    table = pd.read_csv(out / "results.csv")
    assert len(rows) == len(table) == 3
    by = table.set_index("method")
    assert list(by.loc[["l1_filter", "channel_scaling"], "status"]) == ["failed", "failed"]
    assert by.loc["random", "status"] == "ok" and by.loc["random", "acc_mean"] > 0
    assert by.loc[["l1_filter", "channel_scaling"], "acc_mean"].isna().all()
    assert "injected failure" in by.loc["l1_filter", "error"] and by.loc["random", "error"] != by.loc["random", "error"]
    assert by.loc["l1_filter", "params_ratio"] != by.loc["l1_filter", "params_ratio"]  # NaN: no network
    episodes = pd.read_csv(out / "episodes.csv")
    assert set(episodes["row_id"]) == {by.loc["random", "row_id"]}
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text  # strict JSON for `dvc metrics show`: failed rows carry no NaN there
    metrics = json.loads(text)
    assert metrics["failed_cells"] == 2 and any(k.startswith("random/") for k in metrics)
