"""Snakemake parses a study without torch (issue 16): the method registry's metadata (names, sides, arms,
options) is read without importing it, and a real `snakemake -n` of the default config runs with every
torch import refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Put on PYTHONPATH: every process of the dry run refuses to import torch, naming it.
REFUSE_TORCH = '''
import sys


class _RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"refused to import {name} (tests/test_parse_without_torch.py)")
        return None


sys.meta_path.insert(0, _RefuseTorch())
'''

# What the Snakefile and rules/common.smk read of the registry, for every method.
READ_REGISTRY = '''
import sys
from pruneshot.config import load_config
from pruneshot.methods import available, get_method, options_for
cfg = load_config(sys.argv[1])
for name in available():
    method = get_method(name)
    options = options_for(cfg, name)
    method.resolve_options(options)
    method.study_arms(cfg["transfer"])
    (method.side, method.budget_free, method.trains_from_scratch, method.uses_device, method.options_class.specs())
    if method.side == "target":
        method.support_steps(options)
print(len(available()), "torch" in sys.modules)
'''


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNESHOT_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return env


def test_the_registry_is_read_without_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", READ_REGISTRY, str(ROOT / "config/config.yaml")], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, torch_loaded = proc.stdout.split()
    assert int(count) >= 10 and torch_loaded == "False"


def test_a_dry_run_of_the_default_imports_no_torch(tmp_path: Path) -> None:
    block = tmp_path / "refuse_torch"
    block.mkdir()
    (block / "sitecustomize.py").write_text(REFUSE_TORCH)
    refused = subprocess.run([sys.executable, "-c", "import torch"], env=_env(block), capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "refused to import torch" in refused.stderr  # the guard works
    proj = tmp_path / "proj"
    for part in ("workflow", "config", "scripts", "envs"):
        shutil.copytree(ROOT / part, proj / part)
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=proj, env=_env(block),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "Job stats:" in proc.stdout and "transfer" in proc.stdout
    assert "refused to import" not in proc.stdout + proc.stderr
