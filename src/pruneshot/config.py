"""Study configuration: schema validation with defaults, semantic checks, hashing.

Light on imports on purpose: the Snakefile imports this module before any job
starts, so a bad config fails in well under a second and touches nothing.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"

#: ``study.name`` becomes the folders results/<name>/ and logs/<name>/ (the schema's pattern is the same).
STUDY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

class ConfigError(ValueError):
    """A configuration problem, with a message naming the key and what is allowed."""


class DuplicateKeyError(ConfigError):
    """A key given twice in one mapping of a config file."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (PyYAML would keep the last value
    silently), naming the key's path and both lines. A key may still override one merged in with ``<<``."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the whole node tree before anything is constructed: constructing flattens merge keys
        # into the mappings they were merged from, which would look like duplicates.
        self._check_unique_keys(node, (), set())
        return super().construct_document(node)

    def _check_unique_keys(self, node: yaml.Node, path: tuple[Any, ...], visited: set[int]) -> None:
        if id(node) in visited:  # an alias of a node already checked
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique_keys(item, (*path, i), visited)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._check_unique_keys(value_node, path, visited)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):  # a complex key: PyYAML reports it
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    mark, name = first[key].start_mark, _key_path((*path, str(key)))
                    raise DuplicateKeyError(
                        f"config file {mark.name}: key '{name}' is given twice, at line {mark.line + 1} and "
                        f"line {key_node.start_mark.line + 1} (YAML would silently keep the last value); "
                        "keep one of them"
                    )
                first[key] = key_node
                self._check_unique_keys(value_node, (*path, str(key)), visited)


def read_yaml(path: Path | str) -> Any:
    """Read a YAML file with :class:`UniqueKeyLoader` (raises DuplicateKeyError on a repeated key)."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe


def check_config_file(path: Path | str) -> None:
    """Raise DuplicateKeyError if a config file as Snakemake reads it (JSON or YAML) repeats a key."""
    try:
        read_yaml(path)
        return
    except yaml.YAMLError:  # not YAML that PyYAML reads (JSON with tabs, say): check it as JSON
        pass

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise DuplicateKeyError(f"config file {path}: key {key!r} is given twice in one JSON object "
                                        "(JSON readers keep the last value silently); keep one of them")
        return dict(pairs)

    with contextlib.suppress(json.JSONDecodeError):  # neither: Snakemake reports it when it reads the file
        json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=unique)


def load_schema(path: Path | str = SCHEMA_PATH) -> dict[str, Any]:
    """Read the YAML JSON-schema."""
    with open(path) as f:
        return yaml.safe_load(f)


def _key_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key_path(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "enum":
        allowed = ", ".join(map(str, schema.get("enum", [])))
        return f"config key '{key}': {error.instance!r} is not allowed; allowed values: {allowed}"
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(schema.get("properties", {})))
        extra = sorted(set(error.instance) - set(schema.get("properties", {})))
        return (
            f"config key '{key}': unknown key(s) {', '.join(map(repr, extra))}; "
            f"allowed keys: {allowed}"
        )
    if error.validator == "type":
        return f"config key '{key}': {error.instance!r} has the wrong type; expected {schema.get('type')}"
    if error.validator in ("exclusiveMinimum", "minimum", "maximum", "exclusiveMaximum"):
        bounds = []
        if "exclusiveMinimum" in schema:
            bounds.append(f"> {schema['exclusiveMinimum']}")
        if "minimum" in schema:
            bounds.append(f">= {schema['minimum']}")
        if "exclusiveMaximum" in schema:
            bounds.append(f"< {schema['exclusiveMaximum']}")
        if "maximum" in schema:
            bounds.append(f"<= {schema['maximum']}")
        return f"config key '{key}': {error.instance!r} is out of range; allowed: {' and '.join(bounds)}"
    if error.validator == "required":
        return f"config key '{key}': {error.message}"
    return f"config key '{key}': {error.message}"


def _validator_with_defaults(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    base = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config`` against the schema and the semantic rules.

    Returns a new dict with schema defaults filled in. Raises ConfigError whose
    message names every offending key and the allowed values.
    """
    schema = schema if schema is not None else load_schema()
    config = copy.deepcopy(dict(config))
    non_finite = non_finite_numbers(config)
    name_problem = study_name_problem(config)
    validator = _validator_with_defaults(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if name_problem:  # reported once, by study_name_problem, not also as a schema pattern mismatch
        errors = [e for e in errors if not (list(e.absolute_path) == ["study", "name"] and e.validator == "pattern")]
    if non_finite:  # reported once, as not finite, not also as out of range (-inf < 0)
        bad_paths = {tuple(path) for path, _ in non_finite}
        errors = [e for e in errors if tuple(e.absolute_path) not in bad_paths]
    messages = [
        f"config key '{_key_path(path)}': {value!r} is not a finite number; allowed: finite numbers (no NaN or "
        "infinity)"
        for path, value in non_finite
    ]
    messages += [_describe(e) for e in errors] + ([name_problem] if name_problem else [])
    if messages:
        raise ConfigError("invalid config:\n  " + "\n  ".join(messages))
    problems = semantic_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def non_finite_numbers(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], float]]:
    """(key path, value) of every NaN or infinite number in ``obj`` (nested dicts and lists), keys included:
    YAML reads ``.nan``, ``.inf`` and ``-.inf`` as floats, which pass every range check of the schema."""
    found: list[tuple[tuple[Any, ...], float]] = []
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append((path, obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, float) and not math.isfinite(key):
                found.append(((*path, str(key)), key))
            found += non_finite_numbers(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found += non_finite_numbers(value, (*path, i))
    return found


def study_name_problem(config: dict[str, Any]) -> str | None:
    """Why ``study.name`` is not a safe folder name (None when it is, or when it is missing or not a string:
    the schema reports those)."""
    study = config.get("study")
    name = study.get("name") if isinstance(study, dict) else None
    if not isinstance(name, str):
        return None
    if name in (".", "..") or not re.fullmatch(STUDY_NAME_PATTERN, name):
        return (f"config key 'study.name': {name!r} is not a safe folder name (the study writes to "
                f"results/<study.name>/); allowed: {STUDY_NAME_PATTERN}, not '.' or '..'")
    return None


def semantic_problems(config: dict[str, Any]) -> list[str]:
    """Checks a JSON schema cannot express (datasets, splits, shapes, class availability, episode sizes, image
    folders and mirrors on disk)."""
    from pruneshot.data.checks import data_problems

    problems = data_problems(config)
    problems += _budget_problems(config)
    problems += _method_problems(config)
    problems += _backbone_problems(config)
    problems += _selection_problems(config)
    return problems


def _selection_problems(config: dict[str, Any]) -> list[str]:
    """transfer.select: its validation classes exist (an image folder is checked like a target's), then
    :func:`_selection_rules`."""
    sel = (config.get("transfer") or {}).get("select")
    if not sel:
        return []
    from pruneshot.data.checks import selection_data_problems

    return selection_data_problems(sel["data"]) or _selection_rules(config)


def select_ways(config: dict[str, Any]) -> int:
    """Ways of the validation episodes: ``transfer.select.ways``, else ``episodes.ways`` capped at the
    number of validation classes."""
    sel = config["transfer"]["select"]
    return int(sel["ways"]) if sel.get("ways") else min(int(config["episodes"]["ways"]), len(sel["data"]["classes"]))


def _selection_rules(config: dict[str, Any]) -> list[str]:
    """What is wrong with ``transfer.select`` beyond the schema (empty when it is null or sound):
    validation classes that are a target's (or the same digits in another digit dataset) or the
    source's; more ways than classes; a grid with no step count a target-side method could use."""
    sel = (config.get("transfer") or {}).get("select")
    if not sel:
        return []
    from pruneshot.methods import get_method, options_for

    problems = []
    data = sel["data"]
    digits = {"digits", "mnist", "mnist10k"}  # one label space: digit k is the same class in each

    def same_labels(a: dict[str, Any], b: dict[str, Any]) -> bool:
        if a["dataset"] == "imagefolder" or b["dataset"] == "imagefolder":
            return a["dataset"] == b["dataset"] and a.get("root") == b.get("root")
        return a["dataset"] == b["dataset"] or {a["dataset"], b["dataset"]} <= digits

    for name, tgt in config["data"]["targets"].items():
        shared = sorted(set(data["classes"]) & set(tgt["classes"])) if same_labels(data, tgt) else []
        if shared:
            problems.append(f"config key 'transfer.select.data.classes': classes {shared} are target "
                            f"'{name}'s classes ({tgt['dataset']}): transfer settings must never be chosen on "
                            "target classes; allowed: classes no target uses")
    src = config["data"]["source"]
    shared = sorted(set(data["classes"]) & set(src["classes"])) if same_labels(data, src) else []
    if shared:
        problems.append(f"config key 'transfer.select.data.classes': classes {shared} are source classes "
                        f"({src['dataset']}), which pretraining saw; allowed: source classes held out of "
                        "data.source.classes, or another dataset")
    ways = select_ways(config)
    if ways > len(data["classes"]):
        problems.append(f"config key 'transfer.select.ways': {ways}-way validation episodes need at least {ways} "
                        f"classes, transfer.select.data has {len(data['classes'])}")
    for name in config.get("methods", []):
        method = get_method(name)
        if method.side != "target":
            continue
        need = method.support_steps(options_for(config, method))
        if all(s < need for s in sel["steps"]):
            problems.append(f"config key 'transfer.select.steps': {name} adapts for {need} support steps, more "
                            f"than every step count of the grid {sel['steps']}; allowed: at least one >= {need}")
    return problems


def _budget_problems(config: dict[str, Any]) -> list[str]:
    """Budget levels whose labels (:func:`budget_label`, the text in paths, wildcards and results.csv) collide."""
    levels = config["budget"]["levels"]
    first: dict[str, tuple[int, Any]] = {}
    problems = []
    for i, level in enumerate(levels):
        label = budget_label(level)
        if label in first:
            j, other = first[label]
            problems.append(
                f"config key 'budget.levels': levels {other!r} (budget.levels[{j}]) and {level!r} "
                f"(budget.levels[{i}]) both have the label {label!r}, the name of their results; "
                "allowed: levels that still differ when rounded to 6 significant digits"
            )
        else:
            first[label] = (i, level)
    return problems


def _backbone_problems(config: dict[str, Any]) -> list[str]:
    """Options that belong to another backbone family."""
    bb = config["backbone"]
    if bb["name"] == "small_cnn" and "width_mult" in bb:
        return ["config key 'backbone.width_mult': small_cnn takes 'widths', not 'width_mult'"]
    if bb["name"] != "small_cnn" and "widths" in bb:
        return [f"config key 'backbone.widths': {bb['name']} takes 'width_mult' (its widths are fixed by the "
                "architecture), not 'widths'"]
    return []


def _method_problems(config: dict[str, Any]) -> list[str]:
    """Every configured method must have a transfer arm among the configured ones."""
    from pruneshot.methods import get_method

    transfer = config.get("transfer", {})
    arms = transfer.get("arms", ["finetune"])
    dense_only = list(transfer.get("dense_only_arms") or ())
    problems = []
    if [a for a in dense_only if a not in arms]:
        problems.append(f"config key 'transfer.dense_only_arms': {[a for a in dense_only if a not in arms]} "
                        f"not among transfer.arms {arms}")
    elif dense_only and "dense" not in config["methods"]:
        problems.append(f"config key 'transfer.dense_only_arms': {dense_only} run for the dense network only, "
                        "but 'dense' is not among the methods")
    for name in config["methods"]:
        method = get_method(name)
        if not method.study_arms(transfer):
            problems.append(
                f"config key 'transfer.arms': method {name!r} ({method.side}-side) has no arm among {arms}"
                + (f" less transfer.dense_only_arms {dense_only}" if dense_only else "")
                + f"; it is evaluated with {method.arms(['finetune', 'linear_probe', 'reinit'])}"
            )
        if method.side == "target" and any(b < 1.0 for b in config["budget"]["levels"]):
            from pruneshot.methods import options_for

            try:
                steps = method.support_steps(options_for(config, method))
            except ValueError:
                continue  # the method's own option check reports it
            if steps > config["transfer"]["steps"]:
                problems.append(
                    f"config key 'transfer.steps': {name} adapts for {steps} support-set steps per episode, "
                    f"more than transfer.steps ({config['transfer']['steps']}), the support steps every "
                    f"method's arm gets in all (adapt's count inside them); raise transfer.steps or shorten "
                    f"{name}'s schedule"
                )
    return problems


def load_config(path: Path | str) -> dict[str, Any]:
    """Read a YAML config file, rejecting a repeated key, and validate it (defaults filled)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    return validate_config(raw)


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a (validated) config, hex."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def budget_label(budget: float) -> str:
    """Canonical text of a budget level for paths and wildcards: 0.5 -> '0.5', 1.0 -> '1'."""
    return f"{float(budget):g}"


def budget_value(budget: str | float) -> float:
    """A budget label or number as a comparable float: '0.5', 0.5 and 0.5000000001 -> 0.5 (rounded to
    9 decimals, so a label and the float it came from compare equal); NaN when not a finite number."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        return math.nan
    return round(value, 9) if math.isfinite(value) else math.nan
