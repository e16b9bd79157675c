"""Config schema, semantic checks, defaults, hashing and the `pruneshot validate` command."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pruneshot import config as cfgmod
from pruneshot.cli import main as cli_main
from pruneshot.config import ConfigError, budget_label, config_hash, load_schema, validate_config
from pruneshot.data.checks import DATASET_CLASS_SIZES
from pruneshot.methods import available

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture(scope="module")
def raw_default():
    with open(DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


@pytest.fixture
def cfg(raw_default):
    return copy.deepcopy(raw_default)


def _error(cfg, schema) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, schema)
    assert isinstance(err.value, ValueError)
    return str(err.value)


# ------------------------------------------------------------------ valid input


def test_default_config_is_valid(cfg, schema):
    out = validate_config(cfg, schema)
    from pruneshot.methods import available

    # the embedded default runs every registered method but the two baselines left out for its run time
    # (every study config runs them all: tests/test_studies.py), with every transfer arm
    assert sorted(out["methods"]) == sorted(set(available()) - {"taylor", "fpgm"})
    assert out["transfer"]["arms"] == ["finetune", "linear_probe", "reinit", "prototype"]
    # real MNIST digits 0-4 -> 5-9 from the embedded mnist10k, at 14x14 (issue 12: pretraining helps there)
    assert out["data"]["source"] | {"classes": None} == {"dataset": "mnist10k", "classes": None, "val_fraction": 0.2,
                                                         **{k: v for k, v in out["data"]["source"].items()
                                                            if k not in ("dataset", "classes", "val_fraction")}}
    assert out["data"]["source"]["classes"] == [0, 1, 2, 3, 4]
    assert out["data"]["targets"]["mnist_5to9"]["dataset"] == "mnist10k"
    assert out["data"]["targets"]["mnist_5to9"]["classes"] == [5, 6, 7, 8, 9]
    assert out["data"]["image"]["size"] == 14


def test_load_config_reads_the_default_file():
    out = cfgmod.load_config(DEFAULT_CONFIG)
    assert out["study"]["name"] == "mnist10k_default"


def test_validate_does_not_mutate_its_input(cfg, schema):
    del cfg["pretrain"]
    before = copy.deepcopy(cfg)
    validate_config(cfg, schema)
    assert cfg == before


def test_missing_section_is_filled_with_schema_defaults(cfg, schema):
    del cfg["pretrain"]
    out = validate_config(cfg, schema)
    props = schema["properties"]["pretrain"]["properties"]


    def filled(sub):  # a default that is a mapping gets its own properties' defaults too
        if "properties" not in sub:
            return sub["default"]
        return {**sub["default"], **{k: filled(v) for k, v in sub["properties"].items() if "default" in v}}

    expected = {k: filled(v) for k, v in props.items()}
    assert out["pretrain"] == expected
    assert out["pretrain"]["augment"] == {"crop_padding": 0, "flip": False}
    assert out["pretrain"]["epochs"] == props["epochs"]["default"]


def test_missing_nested_keys_are_filled(cfg, schema):
    del cfg["episodes"]["count"]
    del cfg["study"]["root_seed"]
    del cfg["transfer"]
    del cfg["mlflow"]
    del cfg["budget"]["metric"]
    out = validate_config(cfg, schema)
    assert out["episodes"]["count"] == schema["properties"]["episodes"]["properties"]["count"]["default"]
    assert out["study"]["root_seed"] == 0
    assert out["transfer"]["arms"] == ["finetune"]
    assert out["mlflow"] == {"tracking_uri": None, "live": False}
    assert out["budget"]["metric"] == "params"
    # present values are not overwritten by defaults
    assert out["episodes"]["ways"] == cfg["episodes"]["ways"]


def test_schema_method_enum_matches_registry(schema):
    enum = schema["properties"]["methods"]["items"]["enum"]
    assert sorted(enum) == available()
    assert len(enum) == len(set(enum))


# ------------------------------------------------------------------ bad input


def test_unknown_method(cfg, schema):
    cfg["methods"] = ["dense", "magnitude_pruning"]
    msg = _error(cfg, schema)
    assert "methods[1]" in msg
    assert "'magnitude_pruning'" in msg
    for name in ("dense", "linear_probe", "random", "l1_filter"):
        assert name in msg


@pytest.mark.parametrize(("level", "bound"), [(0, "> 0"), (0.0, "> 0"), (1.5, "<= 1"), (-0.2, "> 0")])
def test_budget_out_of_range(cfg, schema, level, bound):
    cfg["budget"]["levels"] = [0.5, level]
    msg = _error(cfg, schema)
    assert "budget.levels[1]" in msg
    assert "out of range" in msg
    assert bound in msg


def test_budget_of_exactly_one_is_allowed(cfg, schema):
    cfg["budget"]["levels"] = [1, 0.1]
    validate_config(cfg, schema)


def test_zero_shots(cfg, schema):
    cfg["episodes"]["shots"] = [0, 5]
    msg = _error(cfg, schema)
    assert "episodes.shots[0]" in msg
    assert ">= 1" in msg


def test_more_shots_than_a_class_has(cfg, schema):
    cfg["episodes"]["shots"] = [1, 900]
    msg = _error(cfg, schema)
    assert "episodes.shots" in msg
    assert "900" in msg
    assert "mnist_5to9" in msg


def test_embedded_class_sizes_are_those_of_the_embedded_files():
    import numpy as np

    from pruneshot.data.prepare import load_raw

    for name in ("digits", "mnist10k"):
        labels, counts = np.unique(load_raw(name).y, return_counts=True)
        assert dict(zip(labels.tolist(), counts.tolist(), strict=True)) == DATASET_CLASS_SIZES[name]


def test_shots_boundary_uses_smallest_target_class(cfg, schema):
    # the smallest of the default target's classes (mnist10k 5..9) is class 5; one query image must remain
    smallest = min(DATASET_CLASS_SIZES["mnist10k"][c] for c in (5, 6, 7, 8, 9))
    cfg["episodes"]["shots"] = [smallest - 1]
    validate_config(cfg, schema)
    cfg["episodes"]["shots"] = [smallest]
    msg = _error(cfg, schema)
    assert f"shots <= {smallest - 1}" in msg


def test_unknown_top_level_key(cfg, schema):
    cfg["pretrian"] = {"epochs": 3}
    msg = _error(cfg, schema)
    assert "'pretrian'" in msg
    assert "pretrain" in msg.replace("'pretrian'", "")  # allowed keys are listed


def test_unknown_nested_key(cfg, schema):
    cfg["episodes"]["querys_per_class"] = 3
    msg = _error(cfg, schema)
    assert "config key 'episodes'" in msg
    assert "'querys_per_class'" in msg
    assert "queries_per_class" in msg.replace("'querys_per_class'", "")


def test_unknown_key_inside_a_target(cfg, schema):
    cfg["data"]["targets"]["mnist_5to9"]["clases"] = [1, 2]
    msg = _error(cfg, schema)
    assert "data.targets.mnist_5to9" in msg
    assert "'clases'" in msg


def test_wrong_type(cfg, schema):
    cfg["episodes"]["count"] = "ten"
    msg = _error(cfg, schema)
    assert "episodes.count" in msg
    assert "'ten'" in msg
    assert "integer" in msg


def test_missing_required_key(cfg, schema):
    del cfg["backbone"]
    msg = _error(cfg, schema)
    assert "backbone" in msg


def test_ways_greater_than_target_classes(cfg, schema):
    cfg["episodes"]["ways"] = 6
    msg = _error(cfg, schema)
    assert "episodes.ways" in msg
    assert "mnist_5to9" in msg


def test_source_and_target_share_a_class(cfg, schema):
    cfg["data"]["targets"]["mnist_5to9"]["classes"] = [4, 5, 6, 7, 8]
    msg = _error(cfg, schema)
    assert "data.targets.mnist_5to9.classes" in msg
    assert "[4]" in msg
    assert "source" in msg


def test_class_not_in_dataset(cfg, schema):
    cfg["data"]["targets"]["mnist_5to9"]["classes"] = [5, 6, 7, 8, 12]
    msg = _error(cfg, schema)
    assert "data.targets.mnist_5to9.classes" in msg
    assert "[12]" in msg


def test_all_errors_are_reported_together(cfg, schema):
    cfg["episodes"]["count"] = "ten"
    cfg["methods"] = ["nope"]
    msg = _error(cfg, schema)
    assert "episodes.count" in msg
    assert "methods[0]" in msg


# ------------------------------------------------------------------ hashing & labels


def _reversed(obj):
    if isinstance(obj, dict):
        return {k: _reversed(obj[k]) for k in reversed(list(obj))}
    return obj


def test_config_hash_stable_under_key_order(cfg, schema):
    a = validate_config(cfg, schema)
    b = _reversed(a)
    assert list(b) != list(a)  # the order really changed
    assert b == a
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64
    int(config_hash(a), 16)


def test_config_hash_changes_with_a_value(cfg, schema):
    a = validate_config(cfg, schema)
    b = copy.deepcopy(a)
    b["episodes"]["count"] += 1
    c = copy.deepcopy(a)
    c["budget"]["levels"] = [0.5, 0.3]
    hashes = {config_hash(a), config_hash(b), config_hash(c)}
    assert len(hashes) == 3


@pytest.mark.parametrize(
    ("budget", "label"), [(1.0, "1"), (1, "1"), (0.5, "0.5"), (0.25, "0.25"), (0.125, "0.125"), (0.1, "0.1")]
)
def test_budget_label(budget, label):
    assert budget_label(budget) == label


# ------------------------------------------------------------------ CLI


def _run_cli(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exc:  # either style of exit is acceptable
        return exc.code


def test_cli_validate_bad_file(tmp_path, cfg, capsys):
    cfg["budget"]["levels"] = [1.5]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = _run_cli(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 2
    text = out.err + out.out
    assert "budget.levels[0]" in text
    assert "<= 1" in text


def test_cli_validate_good_file(tmp_path, cfg, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _run_cli(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_a_method_without_any_configured_arm_is_an_error(cfg, schema):
    bad = {**cfg, "methods": ["basis_scaling"], "transfer": {"arms": ["reinit"]}}
    msg = _error(bad, schema)
    assert "transfer.arms" in msg and "basis_scaling" in msg and "target-side" in msg


def test_dense_only_arms_must_be_configured_arms_and_need_dense(cfg, schema):
    bad = {**cfg, "methods": ["dense", "random"], "transfer": {"arms": ["finetune"], "dense_only_arms": ["reinit"]}}
    msg = _error(bad, schema)
    assert "transfer.dense_only_arms" in msg and "['reinit'] not among transfer.arms" in msg
    bad = {**cfg, "methods": ["random"], "transfer": {"arms": ["finetune", "reinit"], "dense_only_arms": ["reinit"]}}
    assert "'dense' is not among the methods" in _error(bad, schema)
    bad = {**cfg, "methods": ["dense", "random"], "transfer": {"arms": ["reinit"], "dense_only_arms": ["reinit"]}}
    msg = _error(bad, schema)
    assert "'random'" in msg and "less transfer.dense_only_arms ['reinit']" in msg
    good = {**cfg, "methods": ["dense", "random"],
            "transfer": {"arms": ["finetune", "reinit"], "dense_only_arms": ["reinit"]}}
    assert validate_config(good, schema)["transfer"]["dense_only_arms"] == ["reinit"]


# ------------------------------------------------------------------ study name: a folder of its own


@pytest.mark.parametrize("name", [".", "..", "../other", "a/b", "-x", ".hidden", "_x", "a b", "", "x\n", "é"])
def test_study_name_must_be_a_safe_folder_name(cfg, schema, name):
    cfg["study"]["name"] = name
    msg = _error(cfg, schema)
    assert "config key 'study.name'" in msg and repr(name) in msg
    assert "safe folder name" in msg
    assert msg.count("config key 'study.name'") == 1  # reported once, not also as a schema pattern mismatch


@pytest.mark.parametrize("name", ["a", "digits_default", "Study-2.v1", "0x", "a..b"])
def test_safe_study_names_are_accepted(cfg, schema, name):
    cfg["study"]["name"] = name
    assert validate_config(cfg, schema)["study"]["name"] == name


def test_study_name_pattern_is_the_schema_s(schema):
    assert schema["properties"]["study"]["properties"]["name"]["pattern"] == cfgmod.STUDY_NAME_PATTERN


def test_study_name_is_checked_before_any_other_problem(cfg, schema):
    cfg["study"]["name"] = ".."
    cfg["episodes"]["shots"] = [500]  # a semantic problem too: the name is reported with the schema errors
    msg = _error(cfg, schema)
    assert "'..'" in msg and "shots" not in msg


def test_the_schema_offers_exactly_the_arms_the_methods_define():
    """``transfer.arms`` in config/schema.yaml is checked against ``pruneshot.methods.ARMS`` (written once there)."""
    from pruneshot.config import SCHEMA_PATH
    from pruneshot.methods import ARMS

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assert tuple(schema["properties"]["transfer"]["properties"]["arms"]["items"]["enum"]) == ARMS


# ------------------------------------------------------------------ issue 14: nothing wrong marked ok


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("section", "key"), [("transfer", "lr"), ("pretrain", "lr")])
def test_a_non_finite_number_is_rejected(cfg, schema, section, key, value):
    cfg.setdefault(section, {})[key] = value
    msg = _error(cfg, schema)
    assert f"config key '{section}.{key}': {value!r} is not a finite number" in msg
    assert "out of range" not in msg  # -inf is reported once, as not finite


def test_a_non_finite_number_is_rejected_anywhere(cfg, schema):
    cfg["budget"]["levels"] = [0.5, float("nan")]
    cfg["profile"] = {**cfg.get("profile", {}), "batch_sizes": [1, float("inf")]}
    msg = _error(cfg, schema)
    assert "config key 'budget.levels[1]': nan is not a finite number" in msg
    assert "config key 'profile.batch_sizes[1]': inf is not a finite number" in msg


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN", "+.Inf"])
def test_cli_validate_rejects_a_non_finite_number_in_the_file(tmp_path, cfg, capsys, text):
    cfg["transfer"]["lr"] = "LR"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("lr: LR", f"lr: {text}"))
    assert _run_cli(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config key 'transfer.lr': {float(text.replace('.', ''))!r} is not a finite number" in err


@pytest.mark.parametrize(("levels", "label"), [([0.5, 0.5000001], "0.5"), ([1, 0.9999999], "1"),
                                               ([0.25, 0.1, 0.2500004], "0.25")])
def test_budget_levels_whose_labels_collide_are_rejected(cfg, schema, levels, label):
    cfg["budget"]["levels"] = levels
    msg = _error(cfg, schema)
    first, second = levels[0], levels[-1]
    assert (f"config key 'budget.levels': levels {first!r} (budget.levels[0]) and {second!r} "
            f"(budget.levels[{len(levels) - 1}]) both have the label '{label}'") in msg
    assert msg.count("both have the label") == 1


def test_budget_levels_with_distinct_labels_are_accepted(cfg, schema):
    cfg["budget"]["levels"] = [1, 0.999999, 0.5, 0.500001]
    out = validate_config(cfg, schema)
    assert [budget_label(b) for b in out["budget"]["levels"]] == ["1", "0.999999", "0.5", "0.500001"]


def _with_duplicate_key(path: Path) -> tuple[int, int]:
    """Write tests/configs/tiny.yaml to ``path`` with ``transfer.lr`` given twice; (line of the first, second)."""
    lines = TINY.read_text().splitlines()
    at = lines.index("transfer:")
    lines[at + 1:at + 1] = ["  lr: 0.01", "  momentum: 0.9", "  lr: 0.5"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return at + 2, at + 4


def test_load_config_rejects_a_duplicate_key(tmp_path):
    path = tmp_path / "dup.yaml"
    first, second = _with_duplicate_key(path)
    with pytest.raises(ConfigError) as err:
        cfgmod.load_config(path)
    assert str(err.value).startswith(
        f"config file {path}: key 'transfer.lr' is given twice, at line {first} and line {second}")


def test_load_config_rejects_a_duplicate_section(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY.read_text() + "budget:\n  levels: [0.25]\n")
    line = TINY.read_text().splitlines().index("budget:") + 1
    with pytest.raises(ConfigError, match=rf"key 'budget' is given twice, at line {line} and line "
                                          rf"{len(TINY.read_text().splitlines()) + 1}\b"):
        cfgmod.load_config(path)


def test_a_duplicate_key_inside_a_list_is_named_by_its_path(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("a:\n  - {x: 1}\n  - x: 1\n    y: 2\n    x: 3\n")
    with pytest.raises(ConfigError, match=r"key 'a\[1\]\.x' is given twice, at line 3 and line 5\b"):
        cfgmod.read_yaml(path)


def test_a_key_may_override_one_merged_in(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, steps: 4}\nx:\n  y: &d\n    <<: *b\n    lr: 0.2\nz:\n  <<: *d\n")
    assert cfgmod.read_yaml(path) == {"base": {"lr": 0.1, "steps": 4}, "x": {"y": {"lr": 0.2, "steps": 4}},
                                      "z": {"lr": 0.2, "steps": 4}}


def test_cli_validate_rejects_a_duplicate_key(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    first, second = _with_duplicate_key(path)
    assert _run_cli(["validate", str(path)]) == 2
    assert f"key 'transfer.lr' is given twice, at line {first} and line {second}" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("given", ["--configfile", "config/config.yaml"])
def test_snakemake_rejects_a_duplicate_key_before_any_job(tmp_path, given):
    """Snakemake's own YAML reader keeps the last value; the Snakefile reads every config file again."""
    from conftest import BIN, run

    path = tmp_path / ("dup.yaml" if given == "--configfile" else "config/config.yaml")
    first, second = _with_duplicate_key(path)
    extra = ["--configfile", str(path)] if given == "--configfile" else []
    proc = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--snakefile", str(ROOT / "workflow/Snakefile"),
                "--directory", str(tmp_path), *extra], tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"key 'transfer.lr' is given twice, at line {first} and line {second}" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.integration
def test_snakemake_rejects_a_non_finite_number_before_any_job(tmp_path):
    from conftest import BIN, run

    path = tmp_path / "nan.yaml"
    lines = TINY.read_text().splitlines()
    lines.insert(lines.index("transfer:") + 1, "  lr: .nan")
    path.write_text("\n".join(lines) + "\n")
    proc = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--snakefile", str(ROOT / "workflow/Snakefile"),
                "--directory", str(tmp_path), "--configfile", str(path)], tmp_path, check=False)
    assert proc.returncode != 0
    assert "config key 'transfer.lr': nan is not a finite number" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------ image folders and mirrors: checked before any job


def _image_root(base: Path, classes=("cat", "dog", "owl"), per_class: int = 2) -> Path:
    """``base/scans/<class>/<i>.png``: tiny real PNGs (sorted class folders: indices 0, 1, 2), and a stray file."""
    from PIL import Image

    root = base / "scans"
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (4, 3), color=40 * i).save(root / name / f"{i}.png")
    (root / "README.txt").write_text("not a class")
    return root


def _with_image_folder(cfg, root, role: str = "source", classes=(0, 1)):
    """The default config with the source (or every target) read from the image folder ``root``."""
    entry = {"dataset": "imagefolder", "root": str(root), "classes": list(classes)}
    cfg["data"]["image"] = {"size": 14, "channels": 1}  # the mnist10k side's shape
    if role == "source":
        cfg["data"]["source"] = entry
    else:
        cfg["episodes"].update({"ways": 2, "shots": [1]})
        cfg["data"]["targets"] = {"scans": entry}
    return cfg


@pytest.mark.parametrize("role", ["source", "target"])
def test_image_folders_and_mirrors_that_jobs_can_read_are_accepted(cfg, schema, tmp_path, monkeypatch, role):
    root = _image_root(tmp_path)
    (tmp_path / "mirror").mkdir()
    _with_image_folder(cfg, root, role, classes=(2, 0))
    cfg["data"]["download"] = {"mirrors": {"mnist": "https://mirror.example.org/mnist/", "svhn": "http://10.0.0.7:8080",
                                           "cifar10": (tmp_path / "mirror").as_uri() + "/",
                                           "cifar100": f"file://localhost{tmp_path / 'mirror'}"}}
    validate_config(cfg, schema)
    # a relative root is the path the jobs open: relative to the working directory
    monkeypatch.chdir(tmp_path)
    entry = cfg["data"]["source"] if role == "source" else cfg["data"]["targets"]["scans"]
    entry["root"] = "scans"
    validate_config(cfg, schema)


@pytest.mark.parametrize("role", ["source", "target"])
def test_an_image_folder_root_that_does_not_exist_is_rejected(cfg, schema, tmp_path, role):
    root = tmp_path / "nowhere"
    msg = _error(_with_image_folder(cfg, root, role), schema)
    key = "data.source.root" if role == "source" else "data.targets.scans.root"
    assert (f"config key '{key}': {str(root)!r} does not exist; allowed: a directory of class folders, "
            "root/<class>/<image>") in msg, msg


def test_a_relative_root_is_checked_from_the_working_directory(cfg, schema, tmp_path, monkeypatch):
    _image_root(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    msg = _error(_with_image_folder(cfg, "scans"), schema)
    assert (f"config key 'data.source.root': 'scans' (relative to the working directory {tmp_path / 'elsewhere'}) "
            "does not exist") in msg, msg
    msg = _error(_with_image_folder(cfg, "~/scans"), schema)  # the job opens the path as written
    assert "'~/scans' (relative to the working directory" in msg and "; '~' is not expanded) does not exist" in msg


def test_an_image_folder_root_that_is_a_file_is_rejected(cfg, schema, tmp_path):
    root = tmp_path / "scans.zip"
    root.write_bytes(b"PK\x03\x04")
    msg = _error(_with_image_folder(cfg, root), schema)
    assert f"config key 'data.source.root': {str(root)!r} is not a directory" in msg, msg


def test_an_image_folder_root_without_class_folders_is_rejected(cfg, schema, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    msg = _error(_with_image_folder(cfg, root, "target"), schema)
    assert f"config key 'data.targets.scans.root': {str(root)!r} has no class folders" in msg, msg


@pytest.mark.parametrize("role", ["source", "target"])
def test_an_image_folder_missing_a_class_folder_is_rejected(cfg, schema, tmp_path, role):
    """classes are indices into the sorted folder names: index 3 needs a fourth folder."""
    root = _image_root(tmp_path)
    msg = _error(_with_image_folder(cfg, root, role, classes=(0, 3)), schema)
    key = "data.source" if role == "source" else "data.targets.scans"
    assert (f"config key '{key}.classes': classes [3] do not exist in imagefolder root {str(root)!r}: it has 3 class "
            "folders (0 'cat', 1 'dog', 2 'owl'); allowed: 0..2 (indices into the sorted folder names)") in msg, msg


@pytest.mark.parametrize("role", ["source", "target"])
def test_an_image_folder_class_without_images_is_rejected(cfg, schema, tmp_path, role):
    root = _image_root(tmp_path)
    for p in (root / "dog").iterdir():
        p.unlink()
    (root / "dog" / "notes.txt").write_text("no image here")
    (root / "dog" / "nested").mkdir()  # folders inside a class folder are not images either
    msg = _error(_with_image_folder(cfg, root, role), schema)
    key = "data.source.root" if role == "source" else "data.targets.scans.root"
    assert (f"config key '{key}': {str(root)!r}: class folder 'dog' (class 1) holds no image file; allowed: files "
            "ending .png, .jpg, .jpeg, .bmp (any case)") in msg, msg
    _with_image_folder(cfg, root, role, classes=(0, 2))  # the empty folder is not used: accepted
    validate_config(cfg, schema)


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty (0 bytes)"),
    (b"version https://git-lfs.github.com/spec/v1\n", "is not an image file (no PNG, JPEG, BMP, GIF, TIFF or WebP "
                                                      "signature; its first bytes: b'version https://'"),
])
def test_an_image_folder_whose_first_image_cannot_be_read_is_rejected(cfg, schema, tmp_path, content, problem):
    root = _image_root(tmp_path)
    (root / "cat" / "0.png").write_bytes(content)  # the first image of class 0 in name order
    msg = _error(_with_image_folder(cfg, root), schema)
    assert f"config key 'data.source.root': {str(root)!r}: class folder 'cat' (class 0): image '0.png' {problem}" \
        in msg, msg


def test_an_image_folder_target_with_too_few_images_for_the_shots_is_rejected(cfg, schema, tmp_path):
    root = _image_root(tmp_path, per_class=2)
    _with_image_folder(cfg, root, "target")
    cfg["episodes"]["shots"] = [1, 2]
    msg = _error(cfg, schema)
    assert ("config key 'episodes.shots': 2 shots leave no query image in the smallest class of target 'scans' "
            "(2 images); allowed: shots <= 1") in msg, msg


def test_every_image_folder_is_checked(cfg, schema, tmp_path):
    root = _image_root(tmp_path)
    _with_image_folder(cfg, tmp_path / "a", "source")
    cfg["episodes"].update({"ways": 2, "shots": [1]})
    cfg["data"]["targets"] = {"ok": {"dataset": "imagefolder", "root": str(root), "classes": [0, 1]},
                              "bad": {"dataset": "imagefolder", "root": str(tmp_path / "b"), "classes": [0, 1]}}
    msg = _error(cfg, schema)
    assert "'data.source.root'" in msg and "'data.targets.bad.root'" in msg and "'data.targets.ok" not in msg, msg


@pytest.mark.parametrize(("url", "problem"), [
    ("http://", "has no host"),
    ("https:///x", "has no host"),
    ("http://user@/mnist/", "has no host"),
    ("http://mirror:port/", "is not a valid URL (Port could not be cast to integer value as 'port')"),
    ("file://", "names no directory"),
    ("file://server/share/mnist/", "names the host 'server'; allowed: a directory on this machine"),
])
def test_a_mirror_url_without_a_host_or_directory_is_rejected(cfg, schema, url, problem):
    cfg["data"]["download"] = {"mirrors": {"mnist": url}}
    msg = _error(cfg, schema)
    assert f"config key 'data.download.mirrors.mnist': {url!r} {problem}" in msg, msg


def test_a_file_mirror_to_a_missing_directory_is_rejected(cfg, schema, tmp_path):
    (tmp_path / "a file").write_text("x")
    mirrors = {"mnist": (tmp_path / "missing").as_uri() + "/", "svhn": (tmp_path / "a file").as_uri()}
    cfg["data"]["download"] = {"mirrors": mirrors}
    msg = _error(cfg, schema)
    assert (f"config key 'data.download.mirrors.mnist': {mirrors['mnist']!r} is not an existing directory "
            f"({tmp_path / 'missing'}/ does not exist)") in msg, msg
    assert (f"config key 'data.download.mirrors.svhn': {mirrors['svhn']!r} is not an existing directory "
            f"({tmp_path / 'a file'} is not a directory)") in msg, msg


def test_cli_validate_rejects_a_missing_image_folder(tmp_path, cfg, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with_image_folder(cfg, tmp_path / "nowhere")))
    assert _run_cli(["validate", str(path)]) == 2
    assert f"config key 'data.source.root': {str(tmp_path / 'nowhere')!r} does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_snakemake_refuses_a_missing_image_folder_before_deleting_earlier_data(tmp_path):
    """Issue 14: a config that validated but failed in prepare_source let Snakemake delete the study's prepared
    source data before the job ran. Now the root is checked at start-up: no job runs, no file is touched."""
    from conftest import BIN, copy_worktree, run

    proj = tmp_path / "proj"
    copy_worktree(proj)
    config = yaml.safe_load(TINY.read_text())
    (proj / "config/config.yaml").write_text(yaml.safe_dump(config))
    source = proj / "results" / config["study"]["name"] / "data" / "source"  # an earlier run's outputs
    source.mkdir(parents=True)
    for name in ("manifest.json", "train.safetensors", "val.safetensors"):
        (source / name).write_text(f"earlier {name}")
    before = sorted((p.name, p.read_text(), p.stat().st_mtime_ns) for p in source.iterdir())
    config["data"]["image"] = {"size": 8, "channels": 1}
    config["data"]["source"] = {"dataset": "imagefolder", "root": "data/scans", "classes": [0, 1]}
    (proj / "config/config.yaml").write_text(yaml.safe_dump(config))
    # a real run, not -n; --forcerun stands in for the rerun that the changed config (prepare_source's params)
    # triggers after a real first run, whose metadata is not made by hand here
    proc = run([str(BIN / "snakemake"), "--cores", "1", "--forcerun", "prepare_source"], proj, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"config key 'data.source.root': 'data/scans' (relative to the working directory {proj}) does not exist" \
        in out, out
    assert "prepare_source" not in out, out  # no job was planned, let alone run
    assert sorted((p.name, p.read_text(), p.stat().st_mtime_ns) for p in source.iterdir()) == before
    assert not (proj / "logs").exists()


# ------------------------------------------------------------------ transfer.select: never on target classes


def _with_select(cfg: dict, select: dict, source: list[int] | None = None) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["transfer"]["select"] = select
    if source is not None:
        cfg["data"]["source"]["classes"] = source
    return cfg


def test_transfer_select_defaults_and_a_held_out_source_split_are_accepted(cfg, schema):
    """The embedded default (MNIST 0-4 -> 5-9) keeps fixed settings; holding digits 3-4 out of pretraining
    makes a legal validation set; the grid's defaults are the issue's."""
    assert validate_config(cfg, schema)["transfer"]["select"] is None
    out = validate_config(_with_select(cfg, {"data": {"dataset": "mnist10k", "classes": [3, 4]}}, [0, 1, 2]),
                          schema)
    sel = out["transfer"]["select"]
    assert (sel["lr"], sel["steps"], sel["episodes"], sel["ways"]) == ([0.003, 0.01, 0.03], [30, 60, 100], 20, None)
    from pruneshot.config import select_ways

    assert select_ways(out) == 2  # episodes.ways (5) capped at the two validation classes


@pytest.mark.parametrize(("select", "source", "needle"), [
    # target classes of the same dataset
    ({"data": {"dataset": "mnist10k", "classes": [5, 6]}}, None, "classes [5, 6] are target 'mnist_5to9's"),
    # the same digits in another digit dataset
    ({"data": {"dataset": "digits", "classes": [7, 8, 9]}}, None, "classes [7, 8, 9] are target 'mnist_5to9's"),
    # classes pretraining saw
    ({"data": {"dataset": "mnist10k", "classes": [3, 4]}}, None, "classes [3, 4] are source classes"),
    ({"data": {"dataset": "mnist10k", "classes": [3, 4, 12]}}, [0, 1, 2], "classes [12] do not exist in mnist10k"),
    ({"data": {"dataset": "mnist10k", "classes": [3, 4]}, "ways": 3}, [0, 1, 2], "3-way validation episodes"),
    # no grid step count leaves double_pruning's 50 adapt steps room
    ({"data": {"dataset": "mnist10k", "classes": [3, 4]}, "steps": [20, 40]}, [0, 1, 2],
     "double_pruning adapts for 50 support steps"),
])
def test_transfer_select_on_target_or_seen_classes_is_refused(cfg, schema, select, source, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(_with_select(cfg, select, source), schema)
    assert "transfer.select" in str(err.value) and needle in str(err.value)
