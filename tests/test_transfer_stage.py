"""The search and transfer stages without Snakemake: every registered method on real digits data,
tiny sizes. Budget 1 must reproduce the dense method exactly; target-side methods prune per
episode; the reinit arm starts from fresh weights; arms a method does not have are refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pruneshot.config import load_config
from pruneshot.io import read_json
from pruneshot.methods import available, get_method
from pruneshot.models.base import build_seeded
from pruneshot.report.load import latency_columns
from pruneshot.stages.aggregate import aggregate
from pruneshot.stages.data import make_episodes, prepare_source, prepare_target
from pruneshot.stages.job import Job
from pruneshot.stages.pretrain import pretrain
from pruneshot.stages.profile import profile
from pruneshot.stages.search import search
from pruneshot.stages.transfer import transfer

ROOT = Path(__file__).resolve().parents[1]
SHOTS = 2


def _job(rule: str, **wildcards: str) -> Job:
    return Job(rule=rule, wildcards=wildcards, config={}, log_path=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Data, episodes and a pretrained tiny backbone, made by the real stage functions."""
    tmp = tmp_path_factory.mktemp("stages")
    cfg = load_config(ROOT / "tests/configs/tiny.yaml")
    cfg["episodes"]["count"] = 3
    cfg["transfer"]["steps"] = 8  # >= the tiny target-side schedules (double pruning: 4 + 4 adapt steps)
    cfg["data"]["cache_dir"] = str(tmp / "cache")
    src, tgt = tmp / "source", tmp / "target"
    prepare_source(cfg, src, _job("prepare_source"))
    prepare_target(cfg, "digits_5to9", tgt, _job("prepare_target"))
    episodes = tmp / "episodes.json"
    make_episodes(cfg, "digits_5to9", 5, SHOTS, tgt / "manifest.json", episodes, _job("make_episodes"))
    pre = tmp / "pretrain"
    pretrain(cfg, 0, src / "manifest.json", pre / "model.safetensors", pre / "arch.json",
                    pre / "metrics.json", _job("pretrain"))
    return {"cfg": cfg, "tmp": tmp, "src": src, "tgt": tgt, "episodes": episodes, "pre": pre}


def _search(world: dict, method: str, budget: float) -> Path:
    out = world["tmp"] / "search" / method / str(budget)
    if not (out / "record.json").exists():
        pre = world["pre"]
        search(world["cfg"], method, budget, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                      pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                      out / "record.json", _job("search", method=method))
    return out


def _network(world: dict, method: str, budget: float) -> tuple[Path, Path, Path]:
    """(weights, arch, network record) a cell starts from: the searched network of a source-side method,
    the pretrained one (and its metrics) of a target-side method, as the rules wire them."""
    if get_method(method).side == "target":
        pre = world["pre"]
        return pre / "model.safetensors", pre / "arch.json", pre / "metrics.json"
    s = _search(world, method, budget)
    return s / "model.safetensors", s / "arch.json", s / "record.json"


def _transfer_job(world: dict, method: str, budget: float, arms: list[str], cfg: dict | None = None,
                  network: tuple[Path, Path, Path] | None = None, out: Path | None = None) -> dict:
    weights, arch, record = network or _network(world, method, budget)
    out = out or world["tmp"] / "transfer" / f"{method}_{budget}_{'-'.join(arms)}.json"
    return transfer(cfg or world["cfg"], method, arms, SHOTS, "digits_5to9", 0, budget, weights, arch, record,
                    world["src"] / "manifest.json", world["tgt"] / "manifest.json", world["episodes"], out,
                    _job("transfer", method=method))


def _transfer(world: dict, method: str, budget: float, arm: str) -> dict:
    """One arm's results merged with the job's record, plus its accuracies and seeds in episode order."""
    rec = _transfer_job(world, method, budget, [arm])
    return {**rec, **rec["arms"][arm], "arm": arm, "accuracies": _accs(rec["arms"][arm]),
            "finetune_seeds": [e["finetune_seed"] for e in rec["arms"][arm]["episodes"]]}


def _accs(arm: dict) -> list[float]:
    return [e["accuracy"] for e in arm["episodes"]]


# scratch trains anew: at budget 1.0 another dense replicate by design (tests/test_methods_scratch.py)
@pytest.mark.parametrize("method", [m for m in available()
                                    if m != "linear_probe" and not get_method(m).trains_from_scratch])
def test_budget_one_transfers_exactly_like_dense(world, method):
    """At budget 1 a method keeps the dense network, so the paired episodes give identical accuracies."""
    dense = _transfer(world, "dense", 1.0, "finetune")
    rec = _transfer(world, method, 1.0, "finetune")
    assert rec["accuracies"] == dense["accuracies"]
    assert rec["finetune_seeds"] == dense["finetune_seeds"]
    assert [e["episode"] for e in rec["episodes"]] == [e["episode"] for e in dense["episodes"]]
    dense_rec = read_json(_search(world, "dense", 1.0) / "record.json")
    if get_method(method).side == "target":
        assert all(a["params"] == rec["adapted"][0]["params"] for a in rec["adapted"])
        assert rec["achieved"]["achieved_ratio"] == pytest.approx(1.0)
        # no search: the dense cost is counted on the pretrained network, as a search counts it
        assert (rec["dense_params"], rec["dense_flops"]) == (dense_rec["dense_params"], dense_rec["dense_flops"])
        assert rec["network_record"] == (world["pre"] / "metrics.json").as_posix()
    else:
        srec = read_json(_search(world, method, 1.0) / "record.json")
        assert (srec["achieved_params"], srec["achieved_flops"]) == (dense_rec["achieved_params"],
                                                                      dense_rec["achieved_flops"])


def test_arms_share_the_head_seed_but_not_the_training_seed(world):
    ft = _transfer(world, "random", 0.5, "finetune")
    lp = _transfer(world, "random", 0.5, "linear_probe")
    assert ft["episode_seeds"] == lp["episode_seeds"]
    assert ft["finetune_seeds"] != lp["finetune_seeds"]


def test_one_job_with_several_arms_equals_one_job_per_arm(world):
    """Running the arms together (one job) gives each arm exactly what it gets alone."""
    both = _transfer_job(world, "l1_filter", 0.5, ["finetune", "reinit"])
    for arm in ("finetune", "reinit"):
        alone = _transfer(world, "l1_filter", 0.5, arm)
        assert both["arms"][arm]["episodes"] == alone["episodes"]


@pytest.mark.parametrize("method", [m for m in available() if get_method(m).side == "target"])
def test_target_side_arms_share_the_per_episode_pruned_network(world, method):
    both = _transfer_job(world, method, 0.5, ["finetune", "linear_probe"])
    alone = _transfer(world, method, 0.5, "linear_probe")
    assert [a["spec"] for a in both["adapted"]] == [a["spec"] for a in alone["adapted"]]
    assert both["arms"]["linear_probe"]["episodes"] == alone["episodes"]


def test_reinit_arm_starts_from_fresh_weights(world):
    ft = _transfer(world, "l1_filter", 0.5, "finetune")
    ri = _transfer(world, "l1_filter", 0.5, "reinit")
    assert ri["arm"] == "reinit"
    assert ri["accuracies"] != ft["accuracies"]
    again = _transfer(world, "l1_filter", 0.5, "reinit")
    assert again["accuracies"] == ri["accuracies"]


def test_fresh_weights_are_seeded_and_differ_from_pretrained(world):
    import torch

    spec = read_json(world["pre"] / "arch.json")
    a, b = build_seeded(spec, 7), build_seeded(spec, 7)
    c = build_seeded(spec, 8)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.features[0][0].weight, c.features[0][0].weight)
    state = torch.random.get_rng_state()
    build_seeded(spec, 9)
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
    seeds = [a["adapt_seed"] for a in rec["adapted"]]
    assert len(set(seeds)) == len(seeds)
    assert [a["episode"] for a in rec["adapted"]] == [e["episode"] for e in rec["episodes"]]
    for a in rec["adapted"]:
        assert a["achieved_ratio"] <= 0.5 + 0.02
        assert a["adapt_seconds"] > 0
    with pytest.raises(ValueError, match="no search"):  # a target-side method has no source-side search
        _search(world, method, 0.5)
    # the timed network is a per-episode one
    pre = world["pre"]
    prof = profile({**world["cfg"], "profile": {"batch_sizes": [1], "warmup": 0, "repeats": 2, "threads": 1}},
                   pre / "model.safetensors", pre / "arch.json", world["tmp"] / f"profile_{method}.json",
                   _job("profile"), adapted=world["tmp"] / "transfer" / f"{method}_0.5_finetune.json")
    # the cost recorded per episode is the cost of the network it describes
    from pruneshot.models.base import build_model
    from pruneshot.models.cost import cost

    for a in rec["adapted"]:
        net = build_model(a["spec"])
        assert (cost(net, "params"), cost(net, "flops")) == (a["params"], a["flops"])
    assert prof["network"]["episode"] in {a["episode"] for a in rec["adapted"]}


def test_method_options_nest_the_sections_a_method_builds_on(world):
    from pruneshot.methods import options_for

    cfg = copy.deepcopy(world["cfg"])
    for name in available():
        method = get_method(name)
        opts = options_for(cfg, method)
        for section in method.option_sections:
            assert opts[section] == cfg.get(section, {})
        own = cfg.get(name)
        if isinstance(own, dict):
            assert {k: opts[k] for k in own} == own


def test_pretrained_weights_do_not_depend_on_the_cores_snakemake_grants(world):
    """The job's core reservation (Snakemake scales it down under --cores 1) must not change the weights."""
    pre = world["pre"]
    other = world["tmp"] / "pretrain_more_cores"
    job = Job(rule="pretrain", wildcards={}, config={}, threads=3)
    rec = pretrain(world["cfg"], 0, world["src"] / "manifest.json", other / "model.safetensors",
                          other / "arch.json", other / "metrics.json", job)
    assert rec["weights_sha256"] == read_json(pre / "metrics.json")["weights_sha256"]


NO_GPU = not __import__("torch").cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_cuda_requested_without_a_gpu_fails_before_any_work(world):
    cfg = copy.deepcopy(world["cfg"])
    cfg["pretrain"]["device"] = "cuda"
    out = world["tmp"] / "pretrain_cuda"
    with pytest.raises(ValueError, match=r"pretrain\.device is 'cuda' but no CUDA device is usable"):
        pretrain(cfg, 0, world["src"] / "manifest.json", out / "model.safetensors", out / "arch.json",
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
    assert _accs(explicit["arms"]["finetune"]) == _accs(tr["arms"]["finetune"])


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
    assert a["arms"]["finetune"]["episodes"] == b["arms"]["finetune"]["episodes"]
    assert a["device"]["augment"] == "crop_flip"
    seeds = [[e["finetune_seed"] for e in r["arms"]["finetune"]["episodes"]] for r in (a, plain)]
    assert seeds[0] == seeds[1]
    assert _accs(a["arms"]["finetune"]) != _accs(plain["arms"]["finetune"])


def test_profile_records_the_cpu_and_marks_an_absent_cuda(world):
    import math

    s = _search(world, "l1_filter", 0.5)
    cfg = {**world["cfg"], "profile": {"batch_sizes": [1, 4], "devices": ["cpu", "cuda"], "warmup": 0,
                                       "repeats": 2, "threads": 1}}
    prof = profile(cfg, s / "model.safetensors", s / "arch.json", world["tmp"] / "profile_l1.json",
                          _job("profile"))
    assert read_json(world["tmp"] / "profile_l1.json") == prof
    cpu = prof["devices"]["cpu"]
    assert cpu["present"] and cpu["name"].startswith("cpu:") and cpu["name"] == prof["device"]
    assert set(cpu["latency"]) == {"1", "4"} and prof["latency"] == cpu["latency"]
    assert prof["batch_sizes"] == [1, 4] and prof["threads"] == 1
    cols = latency_columns(prof)
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
    only = profile({**cfg, "profile": {**cfg["profile"], "devices": ["cuda"]}}, s / "model.safetensors",
                          s / "arch.json", world["tmp"] / "profile_cuda_only.json", _job("profile"))
    assert "cpu" not in only["devices"] and only["latency"] == {} and only["device"] is None
    cols = latency_columns(only)
    assert set(cols) == {"latency_device", "latency_dtype", "latency_ms_b1", "latency_ms_b4", "latency_cuda_device",
                         "latency_cuda_ms_b1", "latency_cuda_ms_b4"}
    assert math.isnan(cols["latency_ms_b1"])
    # a record written before devices were timed still aggregates
    old = {"device": "cpu:x86_64", "dtype": "float32", "threads": 1,
           "latency": {"1": {"median_ms": 0.5}, "64": {"median_ms": 2.0}}}
    cols = latency_columns(old)
    assert cols["latency_ms_b64"] == 2.0 and math.isnan(cols["latency_cuda_ms_b64"])


# ------------------------------------------------------------------ failed cells


def _fresh_search(world: dict, method: str, budget: float, tag: str) -> Path:
    out = world["tmp"] / f"search_{tag}" / method / str(budget)
    pre = world["pre"]
    search(world["cfg"], method, budget, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                  pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                  out / "record.json", _job("search", method=method))
    return out


def _cell(world: dict, method: str, budget: float, network: tuple[Path, Path, Path], tag: str,
          arm: str = "finetune") -> dict:
    cfg = {**world["cfg"], "profile": {**world["cfg"]["profile"], "batch_sizes": [1], "warmup": 0, "repeats": 2}}
    tr = world["tmp"] / f"transfer_{tag}" / f"{method}.json"
    rec = _transfer_job(world, method, budget, [arm], cfg=cfg, network=network, out=tr)
    prof = world["tmp"] / f"profile_{tag}" / f"{method}.json"
    adapted = tr if get_method(method).side == "target" else None
    profile(cfg, network[0], network[1], prof, _job("profile", method=method), adapted=adapted)
    return {"transfer": tr, "network": network[2], "profile": prof, "pretrain": world["pre"] / "metrics.json",
            "arm": arm, "record": rec}


def _searched(s: Path) -> tuple[Path, Path, Path]:
    return s / "model.safetensors", s / "arch.json", s / "record.json"


def test_a_failing_method_becomes_a_failed_row_and_the_others_are_unaffected(world, monkeypatch):
    import json

    import pandas as pd

    monkeypatch.setenv("PRUNESHOT_INJECT_FAILURE", "search:l1_filter,transfer:channel_scaling")
    bad_search = _fresh_search(world, "l1_filter", 0.5, "fail")
    srec = read_json(bad_search / "record.json")
    assert srec["status"] == "failed" and "injected failure (search:l1_filter" in srec["error"]
    assert read_json(bad_search / "arch.json")["failed"] is True
    cells = [_cell(world, "l1_filter", 0.5, _searched(bad_search), "fail")]
    assert cells[0]["record"]["status"] == "failed"
    assert cells[0]["record"]["error"].startswith("search failed: RuntimeError: injected failure")
    assert read_json(cells[0]["profile"])["status"] == "failed"
    # a target-side method failing inside the transfer job, and a healthy method next to both
    cells.append(_cell(world, "channel_scaling", 0.5, _network(world, "channel_scaling", 0.5), "fail"))
    assert cells[1]["record"]["status"] == "failed" and "transfer:channel_scaling" in cells[1]["record"]["error"]
    monkeypatch.delenv("PRUNESHOT_INJECT_FAILURE")
    cells.append(_cell(world, "random", 0.5, _searched(_fresh_search(world, "random", 0.5, "ok")), "ok"))
    assert cells[2]["record"]["status"] == "ok"
    out = world["tmp"] / "agg_fail"
    rows = aggregate(world["cfg"], cells, world["src"] / "manifest.json",
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
    assert metrics["rows"] == {"ok": 1, "failed": 2} and metrics["failed"] == {"channel_scaling": 1, "l1_filter": 1}
    assert metrics["random"][f"{SHOTS}shot"] == pytest.approx(by.loc["random", "acc_mean"], abs=1e-4)


def test_a_target_side_row_reads_its_network_from_pretrain_and_its_cost_from_the_episodes(world):
    """No search copy: the row's checkpoint is the pretrained network, its dense cost the one a search of the
    dense method counts, its achieved cost the mean over the cell's per-episode networks, its episodes keyed."""
    import pandas as pd

    cells = [_cell(world, "basis_scaling", 0.5, _network(world, "basis_scaling", 0.5), "target_row"),
             _cell(world, "dense", 1.0, _network(world, "dense", 1.0), "target_row")]
    out = world["tmp"] / "agg_target"
    aggregate(world["cfg"], cells, world["src"] / "manifest.json", {"digits_5to9": world["tgt"] / "manifest.json"},
              out / "results.csv", out / "episodes.csv", out / "metrics.json", _job("aggregate"))
    by = pd.read_csv(out / "results.csv").set_index("method")
    row, dense = by.loc["basis_scaling"], by.loc["dense"]
    assert row["status"] == "ok" and row["side"] == "target" and row["search_scope"] == "per episode"
    assert row["checkpoint_sha256"] == row["pretrain_sha256"] == read_json(world["pre"] / "metrics.json")[
        "weights_sha256"]
    assert (row["dense_params"], row["dense_flops"]) == (dense["dense_params"], dense["dense_flops"])
    adapted = cells[0]["record"]["adapted"]
    assert row["achieved_params"] == pytest.approx(sum(a["params"] for a in adapted) / len(adapted))
    assert row["params_ratio"] == pytest.approx(row["achieved_params"] / row["dense_params"])
    assert row["params_ratio"] < 0.55
    episodes = pd.read_csv(out / "episodes.csv")
    mine = episodes[episodes["row_id"] == row["row_id"]]
    arm = cells[0]["record"]["arms"]["finetune"]["episodes"]
    assert list(mine["episode"]) == [e["episode"] for e in arm]
    assert list(mine["accuracy"]) == pytest.approx([e["accuracy"] for e in arm])


def test_the_prototype_arm_classifies_by_feature_centroids_without_training(world):
    """'prototype': each query goes to the nearest support-class centroid (cosine) of the network's features;
    nothing trains, so its accuracy does not depend on the arm's seed, and it equals a centroid rule
    computed here by hand on the same features."""
    import torch
    import torch.nn.functional as F

    from pruneshot.data import splits
    from pruneshot.models.base import load_model
    from pruneshot.training import prototype_accuracy

    rec = _transfer(world, "dense", 1.0, "prototype")
    accs = rec["accuracies"]
    assert len(accs) == world["cfg"]["episodes"]["count"] and all(0 <= a <= 1 for a in accs)
    assert [e["episode"] for e in rec["episodes"]] == list(range(len(accs)))
    # by hand, episode 0
    s = _search(world, "dense", 1.0)
    model = load_model(str(s / "model.safetensors"), read_json(s / "arch.json")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm = read_json(world["src"] / "manifest.json")["normalization"]
    pool = splits.load_split(world["tgt"] / "manifest.json", "pool", norm)
    ep = read_json(world["episodes"])["episodes"][0]
    sx, sy = pool.x[ep["support"]], torch.tensor(ep["support_labels"])
    qx, qy = pool.x[ep["query"]], torch.tensor(ep["query_labels"])
    with torch.no_grad():
        fs = F.normalize(model.forward_features(sx).flatten(1), dim=1)
        fq = F.normalize(model.forward_features(qx).flatten(1), dim=1)
        centroids = torch.stack([F.normalize(fs[sy == c].mean(0), dim=0) for c in range(5)])
        want = float((torch.argmax(fq @ centroids.T, 1) == qy).float().mean())
    assert prototype_accuracy(model, sx, sy, qx, qy) == pytest.approx(want)
    assert accs[0] == pytest.approx(want)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing trained
    # the support itself as queries: each image is closest to its own class centroid far more often than chance
    assert prototype_accuracy(model, sx, sy, sx, sy) > 0.5


def test_the_prototype_arm_runs_on_a_target_side_method_s_pruned_episode_networks(world):
    both = _transfer_job(world, "channel_scaling", 0.5, ["finetune", "prototype"])
    alone = _transfer(world, "channel_scaling", 0.5, "prototype")
    assert both["arms"]["prototype"]["episodes"] == alone["episodes"]
    assert [a["spec"] for a in both["adapted"]] == [a["spec"] for a in alone["adapted"]]


# --- fair by construction: BN treatment, support steps, several random masks, controls (issue 12) ---------


def _source(world: dict):
    from pruneshot.stages.search import load_source

    return load_source(world["src"] / "manifest.json")


def test_bn_recalibration_sets_the_exact_statistics_of_the_calibration_images(world):
    """recalibrate_bn resets every BatchNorm and averages exactly over the drawn images: the first BN's
    running mean equals the per-channel mean of its input over those images, whatever the old statistics."""
    import torch

    from pruneshot.models.base import load_model
    from pruneshot.training import recalibrate_bn

    _, train, _ = _source(world)
    pre = world["pre"]
    model = load_model(str(pre / "model.safetensors"), read_json(pre / "arch.json"))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.fill_(7.0)
    seen = []
    hook = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    info = recalibrate_bn(model, train.x, images=96, batch_size=32, seed=3)  # 3 batches of 32
    hook.remove()
    x = torch.cat(seen)
    assert info["images"] == 96 and len(x) == 96 and [len(b) for b in seen] == [32] * 3 and not model.training
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1  # restored
    again = load_model(str(pre / "model.safetensors"), read_json(pre / "arch.json"))
    recalibrate_bn(again, train.x, images=96, batch_size=32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_every_source_side_search_that_removes_channels_is_recalibrated_and_budget_one_is_not(world):
    """Random pruning at 0.5 leaves the dense BN statistics describing channels that are gone; the search
    stage re-estimates them on the shared source images (the same ones for every method), and source
    accuracy recovers. A budget-1 search returns the pretrained network untouched (its statistics were
    recalibrated at the end of pretraining)."""
    pre = read_json(world["pre"] / "metrics.json")
    assert pre["bn_recalibration"]["applied"] is True
    rec = read_json(_search(world, "random", 0.5) / "record.json")
    bn = rec["bn_recalibration"]
    assert bn["applied"] is True and bn["images"] > 0
    assert bn["source_val_acc_after"] >= bn["source_val_acc_before"]
    assert all(v["applied"] and v["seed"] == bn["seed"] for v in bn["variants"])
    l1 = read_json(_search(world, "l1_filter", 0.5) / "record.json")["bn_recalibration"]
    assert (l1["seed"], l1["images"]) == (bn["seed"], bn["images"])  # the same images for every method
    dense = read_json(_search(world, "dense", 1.0) / "record.json")["bn_recalibration"]
    assert dense["applied"] is False and "unchanged" in dense["reason"]


def test_bn_recalibration_can_be_switched_off(world, tmp_path):
    cfg = copy.deepcopy(world["cfg"])
    cfg["bn_recalibration"]["enabled"] = False
    pre = world["pre"]
    out = tmp_path / "s"
    rec = search(cfg, "random", 0.5, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                 pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                 out / "record.json", _job("search", method="random"))
    bn = rec["bn_recalibration"]
    assert (bn["applied"], bn["reason"]) == (False, "bn_recalibration.enabled is false")
    assert [v["applied"] for v in bn["variants"]] == [False, False]


def test_every_method_s_arm_gets_the_same_number_of_support_steps(world, monkeypatch):
    """A target-side method's adapt steps count inside transfer.steps: its arms train for the rest, so
    every method's network sees the same number of support-set steps, recorded per arm."""
    import pruneshot.training as training
    from pruneshot.methods import scaling

    steps = world["cfg"]["transfer"]["steps"]
    adapt_steps, arm_steps = [], []
    fit = scaling.fit_steps
    ft = training.finetune_episode

    def counting_fit(*args, **kwargs):
        adapt_steps.append(args[4] if len(args) > 4 else kwargs["steps"])
        return fit(*args, **kwargs)

    def counting_ft(*args, **kwargs):
        arm_steps.append(kwargs["steps"])
        return ft(*args, **kwargs)

    for module in ("basis_scaling", "channel_scaling"):  # each calls the fit_steps it imported from scaling
        monkeypatch.setattr(f"pruneshot.methods.{module}.fit_steps", counting_fit)
    monkeypatch.setattr(training, "finetune_episode", counting_ft)
    rec = _transfer_job(world, "double_pruning", 0.5, ["finetune", "prototype"], out=world["tmp"] / "dp_steps.json")
    episodes = world["cfg"]["episodes"]["count"]
    per_episode = sum(adapt_steps) // episodes
    from pruneshot.methods import options_for

    method = get_method("double_pruning")
    assert per_episode == method.support_steps(options_for(world["cfg"], method)) > 0
    assert arm_steps == [steps - per_episode] * episodes
    assert rec["arms"]["finetune"]["support_steps"] == steps
    assert rec["arms"]["prototype"]["support_steps"] == per_episode
    dense = _transfer_job(world, "dense", 1.0, ["finetune"], out=world["tmp"] / "dense_steps.json")
    assert dense["arms"]["finetune"]["support_steps"] == steps


def test_a_schedule_longer_than_the_support_step_budget_is_refused_before_work(world):
    from pruneshot.config import semantic_problems

    cfg = copy.deepcopy(world["cfg"])
    cfg["transfer"]["steps"] = 3
    problems = [p for p in semantic_problems(cfg) if "transfer.steps" in p]
    assert any("double_pruning adapts for" in p for p in problems)
    with pytest.raises(ValueError, match="support-set steps"):
        _transfer_job(world, "channel_scaling", 0.5, ["finetune"], cfg=cfg, out=world["tmp"] / "refused.json")


def test_the_reinit_arm_normalises_with_support_statistics_not_unit_variance(world, monkeypatch):
    """A fresh network's BN statistics (mean 0, var 1) leave it unnormalised in eval mode; the reinit arm
    trains with batch statistics and then sets the running ones from the support images (no source data)."""
    import pruneshot.training as training

    modes = []
    ft = training.finetune_episode

    def spy(*args, **kwargs):
        modes.append(kwargs.get("batch_norm", "frozen"))
        return ft(*args, **kwargs)

    monkeypatch.setattr(training, "finetune_episode", spy)
    _transfer_job(world, "random", 0.5, ["finetune", "reinit"], out=world["tmp"] / "reinit_modes.json")
    # finetune: 3 masks, frozen statistics; reinit: one architecture, batch statistics
    per_episode = modes[: modes.index("batch") + 1]
    assert per_episode == ["frozen"] * 3 + ["batch"]
    import torch

    from pruneshot.stages.transfer import support_bn_statistics

    spec = read_json(world["pre"] / "arch.json")
    model = build_seeded(spec, 5)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    norm = read_json(world["src"] / "manifest.json")["normalization"]
    from pruneshot.data import splits

    pool = splits.load_split(world["tgt"] / "manifest.json", "pool", norm)
    sx = pool.x[read_json(world["episodes"])["episodes"][0]["support"]]
    seen = []
    hook = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    support_bn_statistics(model, sx, seed=1)
    hook.remove()
    assert torch.allclose(bn.running_mean, seen[0].mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():
        h = bn(seen[0])
    assert float(h.mean((0, 2, 3)).abs().max()) < 1e-4  # normalised on the support


def test_random_draws_several_masks_and_every_one_is_evaluated_on_the_same_episodes(world):
    from pruneshot.models.base import load_model, variant_count

    s = _search(world, "random", 0.5)
    rec = read_json(s / "record.json")
    masks = rec["info"]["mask_keeps"]
    assert rec["info"]["masks"] == 3 == len(masks) == rec["networks"] and rec["info"]["distinct_masks"] == 3
    assert masks[0] == rec["keep"]
    assert variant_count(str(s / "model.safetensors")) == 3
    spec = read_json(s / "arch.json")
    nets = [load_model(str(s / "model.safetensors"), spec, v) for v in range(3)]
    assert not all(a.equal(b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(),
                                              strict=True))
    tr = _transfer_job(world, "random", 0.5, ["finetune", "reinit"], out=world["tmp"] / "random3.json")
    ft = tr["arms"]["finetune"]
    for e in ft["episodes"]:
        assert len(e["network_accuracies"]) == 3
        assert e["accuracy"] == pytest.approx(sum(e["network_accuracies"]) / 3)
    assert len(ft["network_means"]) == 3
    assert "network_accuracies" not in tr["arms"]["reinit"]["episodes"][0]  # one architecture: one reinit


def test_one_mask_reproduces_the_single_mask_control(world, tmp_path):
    cfg = copy.deepcopy(world["cfg"])
    cfg["random"] = {"masks": 1}
    pre = world["pre"]
    out = tmp_path / "s"
    rec = search(cfg, "random", 0.5, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                 pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                 out / "record.json", _job("search", method="random"))
    assert rec["networks"] == 1
    assert rec["keep"] == read_json(_search(world, "random", 0.5) / "record.json")["keep"]


def test_dense_cells_score_the_raw_pixel_control_on_the_same_episodes(world):
    import torch

    from pruneshot.data import splits
    from pruneshot.training import pixel_prototype_accuracy

    rec = _transfer_job(world, "dense", 1.0, ["finetune"], out=world["tmp"] / "dense_controls.json")
    pix = rec["controls"]["pixel_prototype"]
    assert [e["episode"] for e in pix["episodes"]] == [e["episode"] for e in rec["arms"]["finetune"]["episodes"]]
    norm = read_json(world["src"] / "manifest.json")["normalization"]
    pool = splits.load_split(world["tgt"] / "manifest.json", "pool", norm)
    ep = read_json(world["episodes"])["episodes"][0]
    want = pixel_prototype_accuracy(pool.x[ep["support"]], torch.tensor(ep["support_labels"]),
                                    pool.x[ep["query"]], torch.tensor(ep["query_labels"]))
    assert pix["episodes"][0]["accuracy"] == want
    assert "controls" not in _transfer_job(world, "l1_filter", 0.5, ["finetune"], out=world["tmp"] / "l1c.json")


def test_budget_one_check_finds_every_method_equal_to_dense_and_catches_one_that_is_not(world, tmp_path,
                                                                                         monkeypatch):
    from pruneshot.stages.sanity import budget_one

    cfg = world["cfg"]
    pre = world["pre"]
    args = (cfg, 0, world["src"] / "manifest.json", pre / "model.safetensors", pre / "arch.json",
            world["tgt"] / "manifest.json", world["episodes"])
    rec = budget_one(*args, tmp_path / "b1.json", _job("budget_one"))
    # dense is the reference; scratch trains a new network, another dense replicate by design: not checked
    assert {r["method"] for r in rec["methods"]} == set(cfg["methods"]) - {"dense", "scratch"}
    assert "scratch" in cfg["methods"]
    assert all(r["equal"] for r in rec["methods"]), rec["methods"]
    # a method that fine-tunes at budget 1 is caught
    from pruneshot.methods.l1_filter import L1Filter

    def nudged(self, ctx):
        import torch

        with torch.no_grad():
            next(ctx.model.parameters()).add_(1e-3)
        from pruneshot.methods.base import SearchResult

        return SearchResult(model=ctx.model)

    monkeypatch.setattr(L1Filter, "search", nudged)
    bad = budget_one(*args, tmp_path / "b2.json", _job("budget_one"))
    row = next(r for r in bad["methods"] if r["method"] == "l1_filter")
    assert row["equal"] is False and "difference" in row["detail"]


# ------------------------------------------------------------------ inputs checked against their producers' hashes


def _flip_byte(src: Path, dst: Path, offset: int = -5) -> None:
    """A copy of ``src`` at ``dst`` with one byte flipped (near the end: in the tensor data, not the header)."""
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))


def _corrupt_pretrain(world: dict, tmp_path: Path) -> Path:
    """A copy of the pretrain outputs whose weights have one byte flipped (the record untouched)."""
    import shutil

    pre = tmp_path / "pretrain"
    shutil.copytree(world["pre"], pre)
    _flip_byte(world["pre"] / "model.safetensors", pre / "model.safetensors")
    return pre


def test_search_refuses_pretrained_weights_that_differ_from_the_pretrain_record(world, tmp_path):
    """Issue 14: a flipped byte in the pretrained weights used to be searched on, its hash recorded as input."""
    from pruneshot.stages.job import InputChangedError

    pre = _corrupt_pretrain(world, tmp_path)
    recorded = read_json(pre / "metrics.json")["weights_sha256"]
    out = tmp_path / "search"
    with pytest.raises(InputChangedError) as err:
        search(world["cfg"], "l1_filter", 0.5, 0, world["src"] / "manifest.json", pre / "model.safetensors",
               pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
               out / "record.json", _job("search", method="l1_filter"))
    msg = str(err.value)
    assert str(pre / "model.safetensors") in msg and recorded in msg and str(pre / "metrics.json") in msg
    from pruneshot.io import sha256_file

    assert sha256_file(pre / "model.safetensors") in msg
    assert not out.exists()  # refused before any output


def test_transfer_refuses_changed_weights_or_architecture_of_its_network(world, tmp_path):
    import shutil

    from pruneshot.stages.job import InputChangedError

    weights, arch, record = _network(world, "l1_filter", 0.5)
    bad = tmp_path / "net"
    shutil.copytree(weights.parent, bad)
    _flip_byte(weights, bad / "model.safetensors")
    with pytest.raises(InputChangedError, match=r"model\.safetensors"):
        _transfer_job(world, "l1_filter", 0.5, ["finetune"], network=(bad / "model.safetensors", arch, record),
                      out=tmp_path / "t1.json")
    spec = read_json(arch)
    spec["widths"] = [*spec.get("widths", []), 1]  # an edited architecture
    (bad / "arch.json").write_text(json.dumps(spec))
    with pytest.raises(InputChangedError, match=r"arch\.json"):
        _transfer_job(world, "l1_filter", 0.5, ["finetune"], network=(weights, bad / "arch.json", record),
                      out=tmp_path / "t2.json")
    # a target-side cell checks the pretrained network against the pretrain record the same way
    pre = _corrupt_pretrain(world, tmp_path)
    with pytest.raises(InputChangedError, match=r"metrics\.json"):
        _transfer_job(world, "channel_scaling", 0.5, ["finetune"],
                      network=(pre / "model.safetensors", pre / "arch.json", pre / "metrics.json"),
                      out=tmp_path / "t3.json")
    assert not any((tmp_path / f"t{i}.json").exists() for i in (1, 2, 3))


def test_transfer_and_budget_one_refuse_edited_episodes(world, tmp_path, monkeypatch):
    from pruneshot.stages.sanity import budget_one

    original = world["episodes"]
    eps = read_json(original)
    assert eps["content_sha256"]
    eps["episodes"][0]["query"][0] = eps["episodes"][0]["query"][1]  # one query index edited
    edited = tmp_path / "episodes.json"
    edited.write_text(json.dumps(eps))
    monkeypatch.setitem(world, "episodes", edited)
    with pytest.raises(ValueError, match="content hash"):
        _transfer_job(world, "l1_filter", 0.5, ["finetune"], out=tmp_path / "t.json")
    pre = world["pre"]
    with pytest.raises(ValueError, match="content hash"):
        budget_one(world["cfg"], 0, world["src"] / "manifest.json", pre / "model.safetensors", pre / "arch.json",
                   world["tgt"] / "manifest.json", edited, tmp_path / "b.json", _job("budget_one"),
                   pretrained_metrics=pre / "metrics.json")
    corrupt = _corrupt_pretrain(world, tmp_path)
    from pruneshot.stages.job import InputChangedError

    with pytest.raises(InputChangedError):
        budget_one(world["cfg"], 0, world["src"] / "manifest.json", corrupt / "model.safetensors",
                   corrupt / "arch.json", world["tgt"] / "manifest.json", original, tmp_path / "b.json",
                   _job("budget_one"), pretrained_metrics=corrupt / "metrics.json")


# ------------------------------------------------------------------ transfer settings chosen on validation


def _select_cfg(world: dict) -> dict:
    """The world's config with transfer.select on validation classes 0-2 (3-way, 2 episodes). The config
    check refuses classes the source saw (tests/test_config.py); the stage itself takes what it is given."""
    cfg = copy.deepcopy(world["cfg"])
    cfg["transfer"]["select"] = {"lr": [0.01, 0.1], "steps": [3, 8], "ways": 3, "episodes": 2,
                                 "data": {"dataset": "digits", "classes": [0, 1, 2], "split": None, "root": None}}
    return cfg


@pytest.fixture(scope="module")
def validation(world: dict) -> dict:
    from pruneshot.config import select_ways
    from pruneshot.stages.data import make_episodes, prepare_select
    from pruneshot.stages.select import SELECT_AXIS

    cfg = _select_cfg(world)
    out = world["tmp"] / "select"
    prepare_select(cfg, out / "data", _job("prepare_select"))
    make_episodes(cfg, SELECT_AXIS, select_ways(cfg), SHOTS, out / "data/manifest.json", out / "episodes.json",
                  _job("make_select_episodes"), count=cfg["transfer"]["select"]["episodes"])
    return {"cfg": cfg, "manifest": out / "data/manifest.json", "episodes": out / "episodes.json", "dir": out}


def _select(world: dict, validation: dict, method: str, budget: float, name: str = "a") -> dict:
    from pruneshot.stages.select import select_transfer

    weights, arch, record = _network(world, method, budget)
    arms = get_method(method).arms(["finetune", "linear_probe", "reinit", "prototype"])
    return select_transfer(validation["cfg"], method, arms, SHOTS, 0, budget, weights, arch, record,
                           world["src"] / "manifest.json", validation["manifest"], validation["episodes"],
                           validation["dir"] / f"{method}_{budget}_{name}.json", _job("select_transfer"))


@pytest.mark.parametrize(("method", "budget"), [("dense", 1.0), ("random", 0.5), ("channel_scaling", 0.5)])
def test_selection_chooses_the_best_grid_point_deterministically(world, validation, method, budget):
    from pruneshot.stages.select import choose

    rec = _select(world, validation, method, budget)
    again = _select(world, validation, method, budget, name="b")
    assert rec["status"] == "ok" and rec["arms"] == again["arms"]
    assert rec["episodes"] == 2 and rec["ways"] == 3
    trained = {"finetune", "linear_probe"} | ({"reinit"} if get_method(method).side == "source" else set())
    assert set(rec["arms"]) == trained
    if get_method(method).side == "target":  # adapt (4 steps) counts inside: 3 steps are not a candidate
        assert rec["adapt_steps"] == 4 and rec["candidate_steps"] == [8]
    else:
        assert rec["candidate_steps"] == [3, 8]
    for arm, r in rec["arms"].items():
        cells = r["mean_accuracy"]
        assert len(cells) == 2 * len(rec["candidate_steps"])
        best = max(c["accuracy"] for c in cells)
        first = next(c for c in sorted(cells, key=lambda c: (c["lr"], c["steps"])) if c["accuracy"] == best)
        assert (r["chosen"]["lr"], r["chosen"]["steps"]) == (first["lr"], first["steps"]), arm
        assert choose({1.0: {5: [0.5, 0.7]}, 2.0: {5: [0.6, 0.6]}}, [2.0, 1.0], [5])["lr"] == 1.0  # tie: smaller lr


def test_transfer_uses_the_chosen_settings_exactly(world, validation):
    """A transfer with a selection record trains each arm with its chosen lr and steps: the same episodes'
    accuracies as a transfer with those values fixed in the config."""
    rec = _select(world, validation, "l1_filter", 0.5)
    sel_path = validation["dir"] / "l1_filter_0.5_a.json"
    weights, arch, record = _network(world, "l1_filter", 0.5)
    arms = ["finetune", "reinit"]
    chosen = transfer(validation["cfg"], "l1_filter", arms, SHOTS, "digits_5to9", 0, 0.5, weights, arch, record,
                      world["src"] / "manifest.json", world["tgt"] / "manifest.json", world["episodes"],
                      world["tmp"] / "sel_transfer.json", _job("transfer"), selection=sel_path)
    for arm in arms:
        want = rec["arms"][arm]["chosen"]
        got = chosen["arms"][arm]
        assert (got["lr"], got["support_steps"], got["settings"]) == (want["lr"], want["steps"], "selected")
        cfg = copy.deepcopy(world["cfg"])
        cfg["transfer"]["lr"], cfg["transfer"]["steps"] = want["lr"], want["steps"]
        fixed = _transfer_job(world, "l1_filter", 0.5, [arm], cfg=cfg, out=world["tmp"] / f"fixed_{arm}.json")
        assert fixed["arms"][arm]["settings"] == "fixed"
        assert _accs(fixed["arms"][arm]) == _accs(got), arm


@pytest.mark.parametrize(("method", "loop"), [("slimming", "slimming sparsity fine-tune"),
                                              ("dnal", "dnal architecture stage"), ("dap", "dap gate search")])
def test_a_diverging_search_is_a_failed_cell_naming_the_loop(world, tmp_path, monkeypatch, method, loop):
    """Issue 14: a search loop whose loss became NaN used to hand on its network as an ok row. Here every
    cross entropy is NaN (gradients still flow); the method's first loop must fail the cell, naming itself."""
    import torch.nn.functional as F

    cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    pre = world["pre"]
    rec = search(world["cfg"], method, 0.5, 0, world["src"] / "manifest.json", pre / "model.safetensors",
                 pre / "arch.json", pre / "metrics.json", tmp_path / "model.safetensors", tmp_path / "arch.json",
                 tmp_path / "record.json", _job("search", method=method))
    assert rec["status"] == "failed" and f"{loop}" in rec["error"] and "became non-finite" in rec["error"], rec


def test_a_diverging_target_side_adapt_is_a_failed_cell(world, tmp_path):
    cfg = copy.deepcopy(world["cfg"])
    cfg["channel_scaling"] = {**(cfg.get("channel_scaling") or {}), "lr": 1e30}
    rec = _transfer_job(world, "channel_scaling", 0.5, ["finetune"], cfg=cfg,
                        network=_network(world, "channel_scaling", 0.5), out=tmp_path / "t.json")
    assert rec["status"] == "failed" and "support-set fit of the scales: the loss became non-finite" in rec["error"]
