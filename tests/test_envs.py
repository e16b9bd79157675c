"""The conda environment, pyproject and lock file pin the same direct dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / "envs" / "pruneshot.yaml"
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")


def _norm(name: str) -> str:
    """PEP 503 normalised project name (PyYAML == pyyaml, scikit_learn == scikit-learn)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str], where: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in lines:
        m = PIN.match(line)
        assert m, f"{where}: {line!r} is not pinned as name==version"
        name = _norm(m.group(1))
        assert name not in pins, f"{where}: {name} listed twice"
        pins[name] = m.group(2)
    return pins


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _project_pins() -> dict[str, str]:
    return _pins(_pyproject()["project"]["dependencies"], "pyproject.toml")


def _env() -> dict:
    with open(ENV_FILE) as f:
        return yaml.safe_load(f)


def _env_pip_entries() -> list[str]:
    pip_sections = [d["pip"] for d in _env()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "envs/pruneshot.yaml needs exactly one pip: section"
    return pip_sections[0]


def test_env_pins_equal_pyproject_pins():
    entries = _env_pip_entries()
    packages = [e for e in entries if not e.startswith("-")]
    env = _pins(packages, "envs/pruneshot.yaml")
    project = _project_pins()
    assert project, "pyproject.toml lists no dependencies"
    assert set(env.items()) == set(project.items())


def test_env_installs_the_project_itself():
    options = [e for e in _env_pip_entries() if e.startswith("-")]
    assert options == ["-e .."]
    # the editable path is relative to the env file and must be the project root
    assert (ENV_FILE.parent / ".." / "pyproject.toml").resolve() == (ROOT / "pyproject.toml").resolve()


def test_env_python_satisfies_requires_python():
    conda = [d for d in _env()["dependencies"] if isinstance(d, str)]
    pythons = [d for d in conda if d.split("=")[0] == "python"]
    assert len(pythons) == 1
    version = tuple(int(v) for v in pythons[0].split("=", 1)[1].lstrip("=").split(".")[:2])
    required = _pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", required)
    assert m, f"unexpected requires-python {required!r}"
    assert version >= (int(m.group(1)), int(m.group(2)))
    # nothing but python and pip comes from conda: every other package is pinned through pip
    assert sorted(d.split("=")[0] for d in conda) == ["pip", "python"]


def test_lock_pins_direct_dependencies_to_the_same_versions():
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.lock").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("-")]
    lock = _pins(lines, "requirements.lock")
    for name, version in _project_pins().items():
        assert name in lock, f"requirements.lock does not pin {name}"
        assert lock[name] == version, f"{name}: pyproject {version}, lock {lock[name]}"


def test_dev_extras_are_pinned():
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    pins = _pins(dev, "pyproject.toml [dev]")
    assert {"pytest", "ruff"} <= set(pins)
