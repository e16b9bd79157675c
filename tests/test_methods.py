"""Pruning methods: registry, budgets, and what each baseline keeps."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from pruneshot import methods
from pruneshot.data.splits import Split
from pruneshot.methods import SearchContext, available, get_method
from pruneshot.methods.base import MethodOptions, PruningMethod, keep_top, option, uniform_widths
from pruneshot.models import cost as metrics
from pruneshot.models import surgery
from pruneshot.models.small_cnn import SmallCNN

WIDTHS = [32, 64, 128]
#: A short pretraining recipe for the methods that train a network anew (scratch).
RECIPE = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "patience": 2,
          "threads": 1}


def _dense(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, input_size=8, widths=WIDTHS, num_classes=5).eval()


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(x=torch.randn((n, 1, 8, 8), generator=gen), y=torch.randint(0, 5, (n,), generator=gen))


def _ctx(model, budget, metric="params", seed=11) -> SearchContext:
    return SearchContext(
        model=model,
        budget=budget,
        metric=metric,
        source_train=_split(20, 1),
        source_val=_split(10, 2),
        seed=seed,
        log=lambda _msg: None,
        recipe=RECIPE,
    )


@pytest.fixture(scope="module")
def dense():
    return _dense()


@pytest.fixture(scope="module")
def results(dense):
    """One search per (method, budget, metric), shared by the tests below (FLOP searches are slow)."""
    out = {}
    for metric in ("params", "flops"):
        for budget in (0.5, 0.25):
            for name in ("random", "l1_filter"):
                model = copy.deepcopy(dense)
                out[name, budget, metric] = (model, get_method(name).search(_ctx(model, budget, metric)))
    return out


KEYS = [(n, b, m) for m in ("params", "flops") for b in (0.5, 0.25) for n in ("random", "l1_filter")]


@pytest.mark.parametrize("key", KEYS, ids=lambda k: "-".join(map(str, k)))
def test_budget_is_met_within_two_points(results, dense, key):
    name, budget, metric = key
    _, res = results[key]
    ratio = metrics.cost(res.model, metric) / metrics.cost(dense, metric)
    assert budget - 0.02 <= ratio <= budget + 0.02, (name, budget, metric, ratio)
    # uniform_widths picks the largest achievable ratio not above the budget
    assert ratio <= budget + 1e-12


@pytest.mark.parametrize("key", KEYS, ids=lambda k: "-".join(map(str, k)))
def test_result_is_physically_smaller(results, dense, key):
    model, res = results[key]
    pruned = res.model
    assert isinstance(pruned, SmallCNN)
    assert pruned is not model
    assert metrics.count_params(pruned) < metrics.count_params(dense)
    assert all(p < d for p, d in zip(pruned.spec["widths"], WIDTHS, strict=True))
    assert [b[0].out_channels for b in pruned.blocks()] == pruned.spec["widths"]
    # keep is consistent with the network and lists valid, sorted, unique dense indices
    assert sorted(res.keep) == ["block0", "block1", "block2"]
    for i, (g, idx) in enumerate(sorted(res.keep.items())):
        assert idx == sorted(set(idx))
        assert all(0 <= j < WIDTHS[i] for j in idx)
        assert len(idx) == pruned.spec["widths"][i]
        assert res.info["widths"][g] == len(idx)
    # the dense model given to the method is left as it was
    assert model.spec["widths"] == WIDTHS
    # the output is that of the masked dense network
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with surgery.channel_masks(model, surgery.keep_to_masks(model, res.keep)):
            masked = model.eval()(x)
        assert (pruned.eval()(x) - masked).abs().max().item() < 1e-5


@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_l1_filter_keeps_top_l1_filters(results, dense, budget, metric):
    _, res = results["l1_filter", budget, metric]
    for i, block in enumerate(dense.blocks()):
        g = f"block{i}"
        w = block[0].weight.detach()
        l1 = w.abs().sum(dim=(1, 2, 3))
        k = len(res.keep[g])
        expected = sorted(torch.topk(l1, k).indices.tolist())
        assert res.keep[g] == expected
        # every kept filter has a larger L1 norm than every dropped one
        dropped = sorted(set(range(WIDTHS[i])) - set(expected))
        assert l1[expected].min() > l1[dropped].max()
    # the pruned convs carry exactly those filters (input channels sliced by the previous group)
    prev = None
    for i, (old, new) in enumerate(zip(dense.blocks(), res.model.blocks(), strict=True)):
        idx = torch.tensor(res.keep[f"block{i}"])
        w = old[0].weight[idx] if prev is None else old[0].weight[idx][:, prev]
        assert torch.equal(new[0].weight, w)
        prev = idx


@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_random_and_l1_share_widths(results, budget, metric):
    r = results["random", budget, metric][1]
    l1 = results["l1_filter", budget, metric][1]
    assert r.model.spec["widths"] == l1.model.spec["widths"]
    assert r.info["widths"] == l1.info["widths"]
    # and the channels they keep differ (random is not magnitude-based)
    assert r.keep != l1.keep


def test_uniform_widths_uses_one_ratio(dense):
    for budget in (0.5, 0.25, 0.1):
        widths = uniform_widths(dense, budget, "params")
        # one ratio r with widths[g] = round(r * n_g): r lies in [(w - 0.5)/n, (w + 0.5)/n] for every group
        lo = max((w - 0.5) / n for w, n in zip(widths.values(), WIDTHS, strict=True))
        hi = min((w + 0.5) / n for w, n in zip(widths.values(), WIDTHS, strict=True))
        assert lo <= hi, widths
    assert uniform_widths(dense, 1.0, "params") == dict(zip(["block0", "block1", "block2"], WIDTHS, strict=True))


def test_uniform_widths_floor_of_one_channel(dense):
    # a budget below what one channel per group costs yields one channel per group
    assert uniform_widths(dense, 1e-6, "params") == {"block0": 1, "block1": 1, "block2": 1}


def test_random_is_deterministic_for_a_seed(dense):
    method = get_method("random")
    a = method.search(_ctx(copy.deepcopy(dense), 0.5, seed=3))
    b = method.search(_ctx(copy.deepcopy(dense), 0.5, seed=3))
    c = method.search(_ctx(copy.deepcopy(dense), 0.5, seed=4))
    assert a.keep == b.keep
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert a.keep != c.keep
    assert a.model.spec == c.model.spec


@pytest.mark.parametrize("masks", [1, 3])
def test_networks_per_cell_counts_the_networks_a_search_returns(dense, masks):
    """random's cell transfers its search's network and variants (distinct masks): ``networks_per_cell``
    says how many (the study-cost benchmark counts training steps by it); every other method one."""
    method = get_method("random")
    ctx = _ctx(copy.deepcopy(dense), 0.5, seed=3)
    ctx.options = {"masks": masks}
    res = method.search(ctx)
    assert 1 + len(res.variants) == masks == method.networks_per_cell(method.resolve_options({"masks": masks}))
    assert method.networks_per_cell(method.resolve_options({})) == 3  # the default
    others = [n for n in available() if n != "random"]
    assert all(get_method(n).networks_per_cell(get_method(n).resolve_options({})) == 1 for n in others)


def test_random_does_not_depend_on_global_rng(dense):
    method = get_method("random")
    torch.manual_seed(0)
    a = method.search(_ctx(copy.deepcopy(dense), 0.25, seed=9))
    torch.manual_seed(12345)
    torch.rand(100)
    b = method.search(_ctx(copy.deepcopy(dense), 0.25, seed=9))
    assert a.keep == b.keep


@pytest.mark.parametrize("name", ["dense", "linear_probe"])
def test_budget_free_methods_return_the_model_unchanged(dense, name):
    model = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = get_method(name).search(_ctx(model, 0.25))
    assert res.model is model
    assert res.keep is None
    assert res.model.spec == dense.spec
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert get_method(name).budget_free


def test_linear_probe_arm_and_default_arms():
    assert get_method("linear_probe").arms(["finetune"]) == ["linear_probe"]
    assert get_method("l1_filter").arms(["finetune", "linear_probe"]) == ["finetune", "linear_probe"]


def test_study_arms_keep_dense_only_arms_for_the_dense_network_alone():
    transfer = {"arms": ["finetune", "linear_probe", "reinit", "prototype"],
                "dense_only_arms": ["reinit", "linear_probe"]}
    assert get_method("dense").study_arms(transfer) == transfer["arms"]
    assert get_method("linear_probe").study_arms(transfer) == ["linear_probe"]
    assert get_method("l1_filter").study_arms(transfer) == ["finetune", "prototype"]
    assert get_method("scratch").study_arms(transfer) == ["finetune", "prototype"]
    assert get_method("channel_scaling").study_arms(transfer) == ["finetune", "prototype"]
    assert get_method("l1_filter").study_arms({"arms": ["finetune", "reinit"]}) == ["finetune", "reinit"]


def test_l1_filter_at_budget_one_keeps_everything(dense):
    res = get_method("l1_filter").search(_ctx(copy.deepcopy(dense), 1.0))
    assert res.model.spec["widths"] == WIDTHS
    assert res.keep == {f"block{i}": list(range(n)) for i, n in enumerate(WIDTHS)}


def test_get_method_unknown_lists_allowed():
    with pytest.raises(ValueError) as err:
        get_method("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for name in ("dense", "linear_probe", "random", "l1_filter"):
        assert name in msg


def test_registry_contents_and_attributes():
    names = available()
    assert {"dense", "linear_probe", "random", "l1_filter"} <= set(names)
    assert names == sorted(names)
    for name in names:
        method = get_method(name)
        assert isinstance(method, PruningMethod)
        cls = methods.REGISTRY[name]
        assert cls.name == name
        assert method.side in {"source", "target"}
        assert isinstance(method.provenance, str)
        assert method.provenance
        assert isinstance(method.budget_free, bool)


def test_registering_a_name_twice_fails():
    class Impostor(PruningMethod):
        name = "random"

        def search(self, ctx):  # pragma: no cover - never called
            raise AssertionError

    available()  # make sure discovery already ran
    with pytest.raises(ValueError, match="twice"):
        methods.register(Impostor)
    assert methods.REGISTRY["random"] is not Impostor


def test_keep_top_is_stable_and_sorted():
    scores = {"g": torch.tensor([0.5, 2.0, 2.0, 0.1, 3.0])}
    # top-3: 4 (3.0), then the tie 1 and 2 (stable: lower index first)
    assert keep_top(scores, {"g": 3}) == {"g": [1, 2, 4]}
    assert keep_top(scores, {"g": 2}) == {"g": [1, 4]}


# scratch trains a network anew: at budget 1.0 another dense replicate by design (tests/test_methods_scratch.py)
@pytest.mark.parametrize("name", [n for n in available() if not get_method(n).trains_from_scratch])
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_every_method_at_budget_one_is_the_dense_network(dense, name, metric):
    """Budget 1 means nothing removed, whatever the method (a source-side search, a target-side method's
    per-episode adapt): dense params and FLOPs, same outputs."""
    from pruneshot.methods import AdaptContext

    method = get_method(name)
    model = copy.deepcopy(dense).eval()
    if method.side == "target":
        support = _split(10, 3)
        res = method.adapt(AdaptContext(model=model, budget=1.0, metric=metric, support_x=support.x,
                                        support_y=support.y, seed=4, dense_cost=metrics.cost(model, metric),
                                        options={}, log=lambda _m: None))
        assert res.model is model  # unchanged, not retrained
    else:
        res = method.search(_ctx(model, 1.0, metric=metric))
    pruned = res.model.eval()
    shape = metrics.input_shape(dense.spec)
    assert metrics.count_params(pruned) == metrics.count_params(dense)
    assert metrics.count_flops(pruned, shape) == metrics.count_flops(dense, shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(x), dense.eval()(x), atol=1e-6)


def _masked_output(res, fallback, x):
    masked = (res.masked if res.masked is not None else fallback).eval()
    with torch.no_grad():
        if res.keep is None:
            return masked(x)
        with surgery.channel_masks(masked, surgery.keep_to_masks(masked, res.keep)):
            return masked(x)


@pytest.mark.parametrize("name", available())
def test_every_method_physical_network_equals_its_masked_form(dense, name):
    """What is saved (smaller tensors, no masks) computes exactly what the masked network computes."""
    from pruneshot.methods import AdaptContext

    method = get_method(name)
    model = copy.deepcopy(dense).eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    if method.side == "target":
        model.reset_classifier(5, torch.Generator().manual_seed(0))
        support = _split(10, 3)
        res = method.adapt(AdaptContext(model=model, budget=0.5, metric="params", support_x=support.x,
                                        support_y=support.y, seed=4, dense_cost=metrics.count_params(model),
                                        options={}, log=lambda _m: None))
    else:
        res = method.search(_ctx(model, 0.5))
    physical = res.model.eval()
    if not method.budget_free:
        assert metrics.count_params(physical) < metrics.count_params(dense)
    # no masks remain: no hooks on any module of the saved network
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in physical.modules())
    with torch.no_grad():
        out = physical(x)
    assert torch.allclose(out, _masked_output(res, model, x), atol=1e-5)


# ------------------------------------------------------------------ options: dataclasses, schema, effective values

# Every method's effective options for config/config.yaml, captured before the options became dataclasses
# (values, key order and types): what ``options_for`` passes and what the method then runs with. Changed
# on purpose by issue 12: basis/channel scaling's schedules fit inside transfer.steps (20 and 30 support
# steps), channel scaling's and slimming's mechanisms act at their defaults, random draws 3 masks.
BASIS = {"importance": "taylor", "ranking": "global", "rounds": 5, "steps_per_round": 4, "lr": 0.01, "momentum": 0.9,
         "revert_when_larger": True}
CHANNEL = {"l1": 0.035, "threshold": 0.1, "ranking": "global", "rounds": 2, "steps_per_round": 15, "lr": 0.15,
           "momentum": 0.9}
PINNED = {
    "basis_scaling": BASIS,
    "channel_scaling": CHANNEL,
    "dap": {"lambda": 1.0, "steps": 300, "batch_size": 64, "lr": 0.05, "theta_init": 0.0, "tau_gate_start": 1.0,
            "tau_gate_end": 0.01, "tau_penalty_start": 1.0, "tau_penalty_end": 0.01, "noise": True,
            "weights": "frozen", "weight_lr": 0.01, "resample_every": 50, "extraction": "topk"},
    "dense": {},
    "dnal": {"arch_epochs": 5, "lr": 0.01, "momentum": 0.9, "batch_size": 64, "threshold": 0.9, "lambda_min": 1e-06,
             "lambda_max": 0.1, "search_steps": 6, "train_fc_in_arch_stage": False, "keep_arch_bn_stats": True},
    "double_pruning": {"order": "channel_first", "first_stage_exponent": 0.5, "channel_scaling": CHANNEL,
                       "basis_scaling": BASIS},
    "l1_filter": {},
    "linear_probe": {},
    "random": {"masks": 3},
    "scratch": {},
    "taylor": {"batches": 16, "batch_size": 64},
    "fpgm": {},
    "slimming": {"l1": 0.02, "epochs": 7, "min_steps": 450, "lr": 0.01, "momentum": 0.9, "batch_size": 64,
                 "rescale": True},
}


def _typed(value):
    """``value`` with the type of every leaf, so 1 != 1.0 != True and key order counts."""
    if isinstance(value, dict):
        return [(k, _typed(v)) for k, v in value.items()]
    return (type(value).__name__, value)


@pytest.fixture(scope="module")
def default_config():
    from pruneshot.config import SCHEMA_PATH, load_config

    return load_config(SCHEMA_PATH.parents[0] / "config.yaml")


def test_effective_options_of_the_default_config_are_pinned(default_config):
    assert sorted(PINNED) == available()
    for name in available():
        method = get_method(name)
        passed = methods.options_for(default_config, method)
        assert _typed(passed) == _typed(PINNED[name]), name
        assert _typed(methods.options_for(default_config, name)) == _typed(passed)
        assert _typed(methods.options_for(default_config, type(method))) == _typed(passed)
        if method.options_class is not methods.base.NoOptions:
            assert _typed(method.resolve_options(passed)) == _typed(PINNED[name]), name
            # defaults alone: the option defaults, except what config.yaml sets on purpose (dnal's arch_epochs)
            own = default_config.get(name) or {}
            defaults = {k: v for k, v in method.resolve_options({}).items() if k not in own}
            assert _typed(defaults) == _typed({k: v for k, v in PINNED[name].items() if k not in own}), name
    assert get_method("dnal").resolve_options({})["arch_epochs"] == 10  # the paper's, overridden by config.yaml


def test_options_for_copies_and_nests_the_sections():
    config = {"double_pruning": {"order": "basis_first"}, "basis_scaling": {"rounds": 2}, "channel_scaling": None}
    out = methods.options_for(config, "double_pruning")
    assert out == {"order": "basis_first", "channel_scaling": {}, "basis_scaling": {"rounds": 2}}
    assert list(out) == ["order", "channel_scaling", "basis_scaling"]
    out["basis_scaling"]["rounds"] = 9
    assert config["basis_scaling"] == {"rounds": 2}
    assert methods.options_for({}, "dap") == {}


def test_schema_file_is_generated_from_the_methods():
    from pruneshot.methods.schema import COMMAND, schema_diff

    diff = schema_diff()
    assert not diff, f"config/schema.yaml differs from the methods' options; run `{COMMAND}`:\n{diff}"


def test_schema_sections_equal_the_options_dataclasses():
    """Parsed, not as text: every section and option of config/schema.yaml is the dataclass's, types included."""
    import json

    from pruneshot.config import load_schema
    from pruneshot.methods.schema import section_schema

    props = load_schema()["properties"]
    assert props["methods"]["items"]["enum"] == available()
    for name in available():
        cls = get_method(name).options_class
        if cls is methods.base.NoOptions:
            assert name not in props, f"{name} has no options but a schema section"
            continue
        expected = section_schema(cls)
        assert json.dumps(props[name]) == json.dumps(expected), name  # order, 1 vs 1.0 vs true
        for spec in cls.specs():
            prop = props[name]["properties"][spec.key]
            assert prop["description"] == spec.help and prop["default"] == spec.default
            assert prop.get("enum") == (list(spec.enum) if spec.enum else None)


def test_schema_check_fails_on_any_difference(tmp_path, capsys):
    from pruneshot.config import SCHEMA_PATH
    from pruneshot.methods.schema import main

    assert main(["--check"]) == 0
    text = SCHEMA_PATH.read_text()
    edits = [("default: 300", "default: 301"), ("enum: [topk, threshold]", "enum: [topk]"),
             ("Adam learning rate of theta.", "Adam learning rate."), ("  steps:\n        type: integer\n",
                                                                        "  steps:\n        type: number\n")]
    for old, new in edits:
        assert text.count(old) >= 1, old
        path = tmp_path / "schema.yaml"
        path.write_text(text.replace(old, new, 1))
        assert main(["--check", "--schema", str(path)]) == 1, old
        assert main(["--write", "--schema", str(path)]) == 0
        assert path.read_text() == text
    capsys.readouterr()
    path.write_text(text.replace("  # END generated", "  # END oops"))
    with pytest.raises(ValueError, match="marker"):
        main(["--check", "--schema", str(path)])


@dataclass(frozen=True)
class Toy(MethodOptions):
    """A toy
    method."""

    mode: Literal["a", "b"] = option("a", "Which mode.")
    lambda_: float = option(1.0, "Weight.", key="lambda", minimum=0, exclusive_maximum=2)
    steps: int = option(3, "Steps: how many.", minimum=1)
    flag: bool = option(False, "A flag.")


def test_options_dataclass_to_schema():
    from pruneshot.methods.schema import render, section_schema

    out = section_schema(Toy)
    assert out == {"type": "object", "additionalProperties": False, "default": {}, "description": "A toy method.",
                   "properties": {
                       "mode": {"type": "string", "enum": ["a", "b"], "default": "a", "description": "Which mode."},
                       "lambda": {"type": "number", "minimum": 0, "exclusiveMaximum": 2, "default": 1.0,
                                  "description": "Weight."},
                       "steps": {"type": "integer", "minimum": 1, "default": 3, "description": "Steps: how many."},
                       "flag": {"type": "boolean", "default": False, "description": "A flag."}}}
    assert Toy.defaults() == {"mode": "a", "lambda": 1.0, "steps": 3, "flag": False}
    assert Toy.resolve("toy", {"lambda": 1}) == {"mode": "a", "lambda": 1, "steps": 3, "flag": False}
    for bad, match in [({"nope": 1}, r"toy: unknown option\(s\) \['nope'\]; allowed: \['flag', 'lambda'"),
                       ({"mode": "c"}, "toy: option 'mode' must be one of a, b, got 'c'"),
                       ({"lambda": 2}, "toy: option 'lambda' must be a number >= 0 and < 2, got 2"),
                       ({"lambda": True}, "option 'lambda'"), ({"steps": 2.0}, "option 'steps' must be an integer"),
                       ({"steps": 0}, "option 'steps'"), ({"flag": 1}, "option 'flag' must be true or false")]:
        with pytest.raises(ValueError, match=match):
            Toy.resolve("toy", bad)
    assert "properties" in render()


def test_register_rejects_a_method_without_an_options_dataclass():
    class Bad(PruningMethod):
        name = "bad_options"
        options_class = dict  # type: ignore[assignment]

        def search(self, ctx):
            return None

    with pytest.raises(TypeError, match="bad_options"):
        methods.register(Bad)
    assert "bad_options" not in methods.REGISTRY

    @dataclass(frozen=True)
    class Undescribed(MethodOptions):
        """No help."""

        steps: int = 3

    Bad.options_class = Undescribed
    with pytest.raises(TypeError, match="option\\(default, help"):
        methods.register(Bad)
    assert "bad_options" not in methods.REGISTRY


def test_resolve_options_validates_and_keeps_the_input():
    opts = {"rounds": 2}
    out = get_method("basis_scaling").resolve_options(opts)
    assert out["rounds"] == 2 and opts == {"rounds": 2} and out is not opts
    with pytest.raises(ValueError, match=r"basis_scaling: unknown option\(s\) \['nope'\]"):
        get_method("basis_scaling").resolve_options({"nope": 1})
    with pytest.raises(ValueError, match="double_pruning: option 'basis_scaling' must be a mapping"):
        get_method("double_pruning").resolve_options({"basis_scaling": [1]})
    with pytest.raises(ValueError, match="dnal: need 0 < lambda_min < lambda_max"):
        get_method("dnal").resolve_options({"lambda_min": 0.5, "lambda_max": 0.1})
    with pytest.raises(ValueError, match="dense: unknown option"):
        get_method("dense").resolve_options({"x": 1})
