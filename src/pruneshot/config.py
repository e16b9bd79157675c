"""Study configuration: schema validation with defaults, semantic checks, hashing.

Light on imports on purpose: the Snakefile imports this module before any job
starts, so a bad config fails in well under a second and touches nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"

# Number of images per class in scikit-learn's digits (the smallest class has 174).
DATASET_CLASS_SIZES: dict[str, dict[int, int]] = {
    "digits": {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180},
}


class ConfigError(ValueError):
    """A configuration problem, with a message naming the key and what is allowed."""


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
    validator = _validator_with_defaults(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(e) for e in errors))
    problems = semantic_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def semantic_problems(config: dict[str, Any]) -> list[str]:
    """Checks a JSON schema cannot express (class availability, episode sizes)."""
    problems: list[str] = []
    src = config["data"]["source"]
    sizes = DATASET_CLASS_SIZES.get(src["dataset"])
    if sizes is not None:
        missing = [c for c in src["classes"] if c not in sizes]
        if missing:
            problems.append(
                f"config key 'data.source.classes': classes {missing} do not exist in "
                f"{src['dataset']}; allowed: {sorted(sizes)}"
            )
    ways = config["episodes"]["ways"]
    max_shots = max(config["episodes"]["shots"])
    for name, tgt in config["data"]["targets"].items():
        key = f"data.targets.{name}"
        sizes = DATASET_CLASS_SIZES.get(tgt["dataset"])
        if sizes is not None:
            missing = [c for c in tgt["classes"] if c not in sizes]
            if missing:
                problems.append(
                    f"config key '{key}.classes': classes {missing} do not exist in "
                    f"{tgt['dataset']}; allowed: {sorted(sizes)}"
                )
                continue
            smallest = min(sizes[c] for c in tgt["classes"])
            if max_shots + 1 > smallest:
                problems.append(
                    f"config key 'episodes.shots': {max_shots} shots leave no query image in "
                    f"the smallest class of target '{name}' ({smallest} images); "
                    f"allowed: shots <= {smallest - 1}"
                )
        if len(tgt["classes"]) < ways:
            problems.append(
                f"config key 'episodes.ways': {ways}-way episodes need at least {ways} classes, "
                f"target '{name}' has {len(tgt['classes'])}"
            )
        if tgt["dataset"] == src["dataset"]:
            shared = sorted(set(tgt["classes"]) & set(src["classes"]))
            if shared:
                problems.append(
                    f"config key '{key}.classes': classes {shared} are also source classes; "
                    "source and target must not share a class within one dataset"
                )
    problems += _method_problems(config)
    return problems


def _method_problems(config: dict[str, Any]) -> list[str]:
    """Every configured method must have a transfer arm among the configured ones."""
    from pruneshot.methods import get_method

    arms = config.get("transfer", {}).get("arms", ["finetune"])
    problems = []
    for name in config["methods"]:
        method = get_method(name)
        if not method.arms(list(arms)):
            problems.append(
                f"config key 'transfer.arms': method {name!r} ({method.side}-side) has no arm among {arms}; "
                f"it is evaluated with {method.arms(['finetune', 'linear_probe', 'reinit'])}"
            )
    return problems


def load_config(path: Path | str) -> dict[str, Any]:
    """Read a YAML config file and validate it (defaults filled)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
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
