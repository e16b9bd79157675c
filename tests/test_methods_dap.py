"""DAP (reconstruction): temperatures, frozen/alternate/resample weights, extraction, budgets, equivalence."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pruneshot.data.splits import Split
from pruneshot.methods import SearchContext, get_method
from pruneshot.methods import dap as dap_mod
from pruneshot.models import cost as metrics
from pruneshot.models import surgery
from pruneshot.models.small_cnn import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [32, 64, 128]
GROUPS = ["block0", "block1", "block2"]
FAST = {"steps": 20, "batch_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(x=torch.randn((n, 1, 8, 8), generator=gen), y=torch.randint(0, 5, (n,), generator=gen))


@pytest.fixture(scope="module")
def dense() -> SmallCNN:
    """A SmallCNN with random weights and non-trivial BN statistics and affine parameters (eval mode)."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, input_size=8, widths=WIDTHS, num_classes=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks():
            bn = block[1]
            bn.running_mean.normal_(0.0, 0.3, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.2, generator=gen)
    return model.eval()


def _ctx(model, budget, *, metric="params", seed=5, options=None, log_metrics=None) -> SearchContext:
    return SearchContext(model=model, budget=budget, metric=metric, source_train=_split(64, 1),
                         source_val=_split(20, 2), seed=seed, options={**FAST, **(options or {})},
                         log=lambda _m: None, log_metrics=log_metrics or (lambda _m, _s=None: None))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_pruned_equals_masked(pruned: nn.Module, dense_model: nn.Module, keep) -> None:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with surgery.channel_masks(dense_model, surgery.keep_to_masks(dense_model, keep)):
            masked = dense_model.eval()(x)
        out = pruned.eval()(x)
    assert (out - masked).abs().max().item() < 1e-5


def _ratio(res, dense_model, metric) -> float:
    return metrics.cost(res.model, metric) / metrics.cost(dense_model, metric)


def _search(dense_model, budget, **kw):
    model = copy.deepcopy(dense_model)
    before = _state(model)
    return model, before, get_method("dap").search(_ctx(model, budget, **kw))


@pytest.fixture(scope="module")
def topk_results(dense):
    return {(b, m): _search(dense, b, metric=m) for m in ("params", "flops") for b in (0.5, 0.25)}


# ----------------------------------------------------------------------------------- registry, options


def test_registered_as_a_source_reconstruction():
    method = get_method("dap")
    assert method.name == "dap"
    assert method.side == "source"
    assert method.provenance == "reconstruction"
    assert "Colombo" in method.reference and "reconstruction" in method.reference
    assert not method.budget_free


def test_defaults_equal_the_schema_section():
    with open(ROOT / "config" / "schema.yaml") as f:
        schema = yaml.safe_load(f)
    assert "dap" in schema["properties"]["methods"]["items"]["enum"]
    section = schema["properties"]["dap"]
    assert section["additionalProperties"] is False
    defaults = {k: p["default"] for k, p in section["properties"].items()}
    code = dap_mod.DAPOptions.defaults()
    assert get_method("dap").options_class is dap_mod.DAPOptions
    assert defaults == code
    # same types too (1 == 1.0 == True in Python)
    assert {k: type(v) for k, v in defaults.items()} == {k: type(v) for k, v in code.items()}
    assert section["properties"]["weights"]["enum"] == list(dap_mod.WEIGHT_MODES)
    assert section["properties"]["extraction"]["enum"] == list(dap_mod.EXTRACTIONS)


@pytest.mark.parametrize(("option", "value"), [
    ("nope", 1), ("tau_gate_end", 0.0), ("tau_penalty_start", -1.0), ("tau_gate_start", 0), ("tau_penalty_end", 0),
    ("steps", 0), ("lambda", -0.1), ("lr", 0.0), ("batch_size", 1), ("weights", "thawed"),
    ("extraction", "magic"), ("resample_every", 0), ("weight_lr", 0.0), ("noise", "yes"),
])
def test_bad_option_is_an_error_naming_it(dense, option, value):
    with pytest.raises(ValueError, match=option):
        get_method("dap").search(_ctx(copy.deepcopy(dense), 0.5, options={option: value}))


# ----------------------------------------------------------------------------------- gates, costs, schedules


def test_gates_sit_at_the_mask_points_and_detach_cleanly(dense):
    model = copy.deepcopy(dense)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        gates = dap_mod.ArchitectureGates(model, theta_init=0.0)
        assert all(torch.equal(t, torch.zeros(n)) for t, n in zip(gates.theta.values(), WIDTHS, strict=True))
        assert not torch.allclose(model(x), ref)  # theta = 0, no noise: every gate is 0.5
        for t in gates.theta.values():
            t.fill_(1.0)
        gates.tau_gate = 0.01  # sigmoid(100) == 1 in float32
        assert torch.allclose(model(x), ref, atol=1e-6)
        gates.theta["block1"].fill_(-1.0)  # sigmoid(-100) is below the gate floor: exactly 0
        closed = model(x)
        gates.remove()
        with surgery.channel_masks(model, {"block1": torch.zeros(WIDTHS[1])}):
            assert torch.equal(closed, model(x))
        assert torch.equal(model(x), ref)
    assert all(not m._forward_hooks for m in model.modules())
    # the gates multiply the ReLU outputs (the mask points)
    assert [m for ms in model.mask_points().values() for m in ms] == [b[2] for b in model.blocks()]


def test_logistic_noise_is_seeded_and_logistic():
    a = dap_mod.logistic_noise(20000, torch.Generator().manual_seed(0))
    b = dap_mod.logistic_noise(20000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # standard logistic: mean 0, variance pi^2 / 3, P(n < 1) = sigmoid(1)
    assert abs(a.mean().item()) < 0.05
    assert a.var().item() == pytest.approx(math.pi**2 / 3, rel=0.05)
    assert (a < 1.0).float().mean().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)


@pytest.mark.parametrize("metric", ["params", "flops"])
def test_cost_shares_are_one_channel_saving(dense, metric):
    shares = dap_mod.cost_shares(dense, metric)
    assert list(shares) == GROUPS
    total = metrics.cost(dense, metric)
    for i, g in enumerate(GROUPS):
        widths = list(WIDTHS)
        widths[i] -= 1
        smaller = SmallCNN(in_channels=1, input_size=8, widths=widths, num_classes=5)
        assert shares[g] == pytest.approx((total - metrics.cost(smaller, metric)) / total)
    if metric == "params":  # block0: its own 3x3x1 filter, BN scale and shift, 64 input filters of block1
        assert shares["block0"] == pytest.approx((9 + 2 + 9 * 64) / total)


def test_geometric_schedule_formula():
    assert dap_mod.geometric_schedule(2.0, 0.5, 1) == [2.0]
    s = dap_mod.geometric_schedule(1.0, 0.01, 5)
    assert s[0] == 1.0
    assert s[-1] == pytest.approx(0.01, rel=1e-12)
    assert s == pytest.approx([0.01 ** (t / 4) for t in range(5)], rel=1e-12)


def test_both_temperatures_follow_their_geometric_schedules(dense):
    steps = 9
    opts = {"steps": steps, "tau_gate_start": 2.0, "tau_gate_end": 0.05, "tau_penalty_start": 0.5,
            "tau_penalty_end": 0.02}
    logged: dict[int, dict[str, float]] = {}
    res = get_method("dap").search(_ctx(copy.deepcopy(dense), 0.5, options=opts,
                                        log_metrics=lambda m, s=None: logged.setdefault(s, {}).update(m)))
    info = res.info
    for key, start, end in (("tau_gate", 2.0, 0.05), ("tau_penalty", 0.5, 0.02)):
        sched = info[f"{key}_schedule"]
        want = [start * (end / start) ** (t / (steps - 1)) for t in range(steps)]
        assert len(sched) == steps
        assert sched == pytest.approx(want, rel=1e-12)
        assert sched[0] == start
        assert sched[-1] == pytest.approx(end, rel=1e-12)
        assert [logged[t][f"dap_{key}"] for t in range(steps)] == pytest.approx(want, rel=1e-12)
        assert info[f"{key}_end"] == pytest.approx(end)
    steps1 = get_method("dap").search(_ctx(copy.deepcopy(dense), 0.5, options={**opts, "steps": 1})).info
    assert steps1["tau_gate_schedule"] == [2.0] and steps1["tau_penalty_schedule"] == [0.5]


def test_the_schedules_drive_the_gate_and_the_penalty(dense):
    """The gate uses tau_gate(t) and the recorded penalty is sum_c cost_c * sigmoid(theta_c / tau_penalty(t))."""
    model = copy.deepcopy(dense)
    opts = get_method("dap").resolve_options({"steps": 6, "batch_size": 16, "tau_penalty_start": 3.0,
                                              "tau_penalty_end": 0.1})
    costs = dap_mod.cost_shares(model, "params")
    gates = dap_mod.ArchitectureGates(model)
    seen = []

    def record(step, g, _m):  # theta before this step's update, and the gate temperature in use
        seen.append((step, g.tau_gate, {k: v.detach().clone() for k, v in g.theta.items()}))

    rows, _ = dap_mod.architecture_search(model, gates, _split(64, 1), costs, opts, seed=0, on_backward=record)
    gates.remove()
    taus_p = dap_mod.geometric_schedule(3.0, 0.1, 6)
    assert [s[1] for s in seen] == dap_mod.geometric_schedule(1.0, 0.01, 6)
    assert all(torch.equal(t, torch.zeros(n)) for t, n in zip(seen[0][2].values(), WIDTHS, strict=True))
    for (t, _tau, theta), row in zip(seen, rows, strict=True):
        want = sum(costs[g] * torch.sigmoid(theta[g] / taus_p[t]).sum().item() for g in GROUPS)
        assert row["penalty"] == pytest.approx(want, rel=1e-5)
        assert row["tau_penalty"] == taus_p[t]


# ----------------------------------------------------------------------------------- weights


def test_frozen_theta_gets_gradients_and_weights_none(dense):
    model = copy.deepcopy(dense)
    model.train()  # the search must switch to eval mode and back
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    opts = get_method("dap").resolve_options({"steps": 4, "batch_size": 16})
    gates = dap_mod.ArchitectureGates(model)
    calls = []

    def check(step, g, m):
        for name, t in g.theta.items():
            assert t.grad is not None and torch.isfinite(t.grad).all(), name
            assert t.grad.abs().sum() > 0, name
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
        assert not any(mod.training for mod in m.modules())
        calls.append(step)

    dap_mod.architecture_search(model, gates, _split(64, 1), dap_mod.cost_shares(model, "params"), opts, seed=0,
                                on_backward=check)
    gates.remove()
    assert calls == [0, 1, 2, 3]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires  # restored
    assert model.training


def test_alternate_trains_weights_in_train_mode(dense):
    model = copy.deepcopy(dense)
    opts = get_method("dap").resolve_options({"steps": 3, "batch_size": 16, "weights": "alternate"})
    gates = dap_mod.ArchitectureGates(model)

    def check(_step, g, m):
        assert all(t.grad is not None for t in g.theta.values())
        assert all(p.grad is not None for p in m.parameters())
        assert all(mod.training for mod in m.modules())

    dap_mod.architecture_search(model, gates, _split(64, 1), dap_mod.cost_shares(model, "params"), opts, seed=0,
                                on_backward=check)
    gates.remove()
    assert not model.training  # the eval mode it came in with is restored


def test_frozen_changes_no_weight_or_buffer_and_returns_pretrained_weights(dense, topk_results):
    model, before, res = topk_results[0.5, "params"]
    _assert_same_state(_state(model), before)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    _assert_same_state(_state(res.model), _state(dense.pruned(res.keep)))
    # theta did train
    assert res.info["theta_stats"]["max"] != res.info["theta_stats"]["min"]


@pytest.mark.parametrize("mode", ["alternate", "resample"])
def test_trained_weights_never_reach_the_pruned_network(dense, mode):
    model, before, res = _search(dense, 0.5, options={"weights": mode, "resample_every": 7})
    after = _state(model)
    # the working weights moved (conv, BN affine and running statistics alike) ...
    for k in before:
        if "num_batches" not in k:
            assert not torch.equal(after[k], before[k]), k
    # ... but the pruned network holds the pretrained weights and statistics of its kept channels
    _assert_same_state(_state(res.model), _state(dense.pruned(res.keep)))
    _assert_pruned_equals_masked(res.model, dense, res.keep)
    assert res.info["weights_mode"] == mode
    assert res.info["weights_resampled_at"] == ([7, 14] if mode == "resample" else [])


def test_resample_reinitialises_the_weights(dense):
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    dap_mod.reinitialise(a, 3)
    torch.manual_seed(123)  # the global RNG does not matter ...
    state = torch.get_rng_state()
    dap_mod.reinitialise(b, 3)
    assert torch.equal(torch.get_rng_state(), state)  # ... and is not consumed
    _assert_same_state(_state(a), _state(b))
    assert not torch.equal(a.blocks()[0][0].weight, dense.blocks()[0][0].weight)
    assert torch.equal(a.blocks()[0][1].running_var, torch.ones(WIDTHS[0]))
    # the resampled run's working weights differ from the alternate run's
    ma, _, _ = _search(dense, 0.5, options={"weights": "alternate", "steps": 8})
    mr, _, _ = _search(dense, 0.5, options={"weights": "resample", "steps": 8, "resample_every": 4})
    assert not torch.equal(ma.blocks()[1][0].weight, mr.blocks()[1][0].weight)


# ----------------------------------------------------------------------------------- extraction, budgets


@pytest.mark.parametrize("key", [(0.5, "params"), (0.25, "params"), (0.5, "flops"), (0.25, "flops")], ids=str)
def test_topk_meets_budget_within_two_points_from_below(dense, topk_results, key):
    budget, metric = key
    _, _, res = topk_results[key]
    ratio = _ratio(res, dense, metric)
    assert budget - 0.02 <= ratio <= budget + 1e-12, ratio
    info = res.info
    assert info["achieved_ratio"] == pytest.approx(ratio)
    assert info["gap"] == pytest.approx(budget - ratio)
    assert info["requested_budget"] == budget and info["metric"] == metric
    assert info["met_from_below"]
    assert info["widths"] == {g: len(i) for g, i in res.keep.items()} == dict(zip(GROUPS, res.model.spec["widths"],
                                                                                  strict=True))


@pytest.mark.parametrize("key", [(0.5, "params"), (0.25, "flops")], ids=str)
def test_topk_is_one_global_theta_cut(dense, topk_results, key):
    budget, metric = key
    _, _, res = topk_results[key]
    theta = {g: torch.tensor(v) for g, v in res.info["theta"].items()}
    flat = [(float(theta[g][c]), g, c) for g in GROUPS for c in range(len(theta[g]))]
    order = sorted(range(len(flat)), key=lambda j: -flat[j][0])  # Python's sort is stable
    top = {g: int(torch.argsort(-theta[g], stable=True)[0]) for g in GROUPS}
    n = res.info["global_kept"]
    want = {g: sorted({top[g]} | {flat[j][2] for j in order[:n] if flat[j][1] == g}) for g in GROUPS}
    assert res.keep == want
    # the cut is maximal: one more channel of the global order would exceed the budget
    nxt = {g: set(i) for g, i in want.items()}
    for j in order[n:]:
        _, g, c = flat[j]
        if c not in nxt[g]:
            nxt[g].add(c)
            break
    bigger = dense.pruned({g: sorted(i) for g, i in nxt.items()})
    assert metrics.cost(bigger, metric) / metrics.cost(dense, metric) > budget


def test_topk_keeps_one_channel_per_group_when_the_budget_is_tiny(dense):
    theta = {g: torch.linspace(-1.0, 1.0, n) for g, n in zip(GROUPS, WIDTHS, strict=True)}
    theta["block1"][5] = 9.0
    keep, n, ratio = dap_mod.topk_keep(dense, theta, 1e-6, "params")
    assert n == 0
    assert keep == {"block0": [31], "block1": [5], "block2": [127]}
    assert ratio == pytest.approx(metrics.cost(dense.pruned(keep), "params") / metrics.cost(dense, "params"))


def test_threshold_keep_and_forced_top_theta():
    theta = {"block0": torch.full((6,), -1.0), "block1": torch.tensor([0.3, -0.2, 1e-3, -5.0]),
             "block2": torch.tensor([-2.0, -0.5, -0.5, -3.0])}
    theta["block0"][4] = -0.1
    keep, forced = dap_mod.threshold_keep(theta, 0.01)
    assert keep == {"block0": [4], "block1": [0, 2], "block2": [1]}
    assert forced == {"block0": 4, "block2": 1}  # ties: the first index


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_threshold_reports_its_gap_honestly(dense, budget):
    model, before, res = _search(dense, budget, options={"extraction": "threshold", "lambda": 0.2})
    ratio = _ratio(res, dense, "params")
    assert res.info["achieved_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert res.info["gap"] == pytest.approx(budget - ratio, rel=1e-12)
    assert res.info["met_from_below"] == (ratio <= budget)
    theta = {g: torch.tensor(v) for g, v in res.info["theta"].items()}
    for g in GROUPS:
        open_ = torch.nonzero(torch.sigmoid(theta[g] / 0.01) > 0.5).flatten().tolist()
        assert res.keep[g] == (open_ or [res.info["forced_keep"][g]])
    _assert_same_state(_state(model), before)
    _assert_pruned_equals_masked(res.model, dense, res.keep)


@pytest.mark.parametrize("key", [(0.5, "params"), (0.25, "params"), (0.25, "flops")], ids=str)
def test_pruned_equals_masked_dense(dense, topk_results, key):
    _, _, res = topk_results[key]
    assert isinstance(res.model, SmallCNN)
    assert all(not m._forward_hooks for m in res.model.modules())
    for i, g in enumerate(GROUPS):
        assert res.keep[g] == sorted(set(res.keep[g])) and all(0 <= c < WIDTHS[i] for c in res.keep[g])
    _assert_pruned_equals_masked(res.model, dense, res.keep)


def test_info_records_the_search(topk_results):
    _, _, res = topk_results[0.5, "params"]
    info = res.info
    assert info["reconstruction"] is True
    assert info["options"] == {**dap_mod.DAPOptions.defaults(), **FAST}
    assert info["extraction"] == "topk"
    assert 0.0 <= info["source_val_acc_pruned"] <= 1.0
    stats = info["theta_stats"]
    all_theta = torch.tensor([v for g in GROUPS for v in info["theta"][g]])
    assert stats["mean"] == pytest.approx(all_theta.mean().item(), rel=1e-6)
    assert stats["open"] == int((all_theta > 0).sum())
    assert sorted(stats["per_group"]) == GROUPS
    assert [len(info["theta"][g]) for g in GROUPS] == WIDTHS
    assert len(info["history"]) == FAST["steps"]
    assert sorted(info["cost_shares"]) == GROUPS


def test_budget_one_returns_the_dense_network_untrained(dense):
    model, before, res = _search(dense, 1.0)
    assert res.model is model
    _assert_same_state(_state(res.model), before)
    assert res.keep == {g: list(range(n)) for g, n in zip(GROUPS, WIDTHS, strict=True)}
    assert res.info["achieved_ratio"] == 1.0 and res.info["gap"] == 0.0
    assert res.info["reconstruction"] is True
    assert "theta" not in res.info


# ----------------------------------------------------------------------------------- determinism, noise


def test_deterministic_for_a_seed_and_noise_matters(dense):
    a = _search(dense, 0.5, seed=7)[2]
    torch.manual_seed(999)  # the global RNG does not matter
    b = _search(dense, 0.5, seed=7)[2]
    assert a.keep == b.keep
    assert a.info["theta"] == b.info["theta"]
    assert a.info["history"] == b.info["history"]
    _assert_same_state(_state(a.model), _state(b.model))
    other_seed = _search(dense, 0.5, seed=8)[2]
    assert other_seed.info["theta"] != a.info["theta"]
    quiet = _search(dense, 0.5, seed=7, options={"noise": False})[2]
    assert quiet.info["theta"] != a.info["theta"]
    # without noise the seed only orders the mini-batches: the same batches give the same theta
    quiet_again = _search(dense, 0.5, seed=7, options={"noise": False})[2]
    assert quiet_again.info["theta"] == quiet.info["theta"]
