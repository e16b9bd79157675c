# Config look-ups and target lists; rules stay declarative.
from pruneshot.config import budget_label, config_hash
from pruneshot.methods import get_method
from pruneshot.runtime.provenance import git_state

# The git state travels to every job through the environment, never through params
# (a commit in params would rerun everything on every commit).
_commit, _dirty = git_state(workflow.basedir)
os.environ.setdefault("PRUNESHOT_GIT_COMMIT", _commit)
os.environ.setdefault("PRUNESHOT_GIT_DIRTY", "1" if _dirty else "0")
CONFIG_SHA256 = config_hash(config)

METHODS = {name: get_method(name) for name in config["methods"]}
BUDGETS = [budget_label(b) for b in config["budget"]["levels"]]
REPLICATES = list(range(config["study"]["replicates"]))
TARGETS = list(config["data"]["targets"])
SHOTS = [int(s) for s in config["episodes"]["shots"]]
WAYS = int(config["episodes"]["ways"])


def method_budgets(method):
    """Budget labels a method runs at: budget-free methods only at 1."""
    return ["1"] if METHODS[method].budget_free else BUDGETS


def method_arms(method):
    return METHODS[method].arms(config["transfer"]["arms"])


def networks():
    """(method, budget, replicate) of every searched network."""
    return [(m, b, r) for m in METHODS for b in method_budgets(m) for r in REPLICATES]


def cells():
    """Every transfer cell as a dict of wildcards."""
    return [
        dict(method=m, budget=b, replicate=r, target=t, shots=s, arm=a)
        for (m, b, r) in networks()
        for t in TARGETS
        for s in SHOTS
        for a in method_arms(m)
    ]


def all_cores():
    """Every core of this run (1 when none is set, e.g. under --report or --lint)."""
    return workflow.resource_settings.cores or 1


def _alts(values):
    return "|".join(sorted({str(v).replace(".", r"\.") for v in values}))


wildcard_constraints:
    method=_alts(METHODS),
    budget=_alts(BUDGETS + ["1"]),
    replicate=_alts(REPLICATES),
    target=_alts(TARGETS),
    shots=_alts(SHOTS),
    ways=_alts([WAYS]),


# One transfer job per (network, target, shots) runs every arm of the method on the same episodes.
TRANSFER = "results/transfer/{target}/{method}/b{budget}/{shots}shot/r{replicate}.json"
SEARCH_RECORD = "results/search/{method}/b{budget}/r{replicate}/record.json"
PROFILE = "results/profile/{method}/b{budget}/r{replicate}.json"


def profile_inputs(wildcards):
    """The searched network; for a target-side method also one transfer record, whose
    per-episode pruned networks are what gets timed (the method declares its side)."""
    w = dict(method=wildcards.method, budget=wildcards.budget, replicate=wildcards.replicate)
    inputs = {
        "weights": "results/search/{method}/b{budget}/r{replicate}/model.safetensors".format(**w),
        "arch": "results/search/{method}/b{budget}/r{replicate}/arch.json".format(**w),
    }
    if METHODS[wildcards.method].side == "target":
        inputs["adapted"] = TRANSFER.format(**w, target=TARGETS[0], shots=max(SHOTS))
    return inputs


def aggregate_inputs():
    """Every record aggregate reads, once."""
    return sorted({path for cell in aggregate_cells() for key, path in cell.items() if key != "arm"})


# --- settings each rule reads ----------------------------------------------------------------
# A rule's params carry a hash of exactly the config settings it reads, so editing one setting
# reruns the rules that read it (Snakemake's params trigger) and, through their outputs, what
# depends on them, and nothing else. Without this, a changed seed or option would silently
# reuse results computed under the old value.


def settings_hash(*parts):
    """16-hex sha256 of JSON-serialised config parts."""
    import hashlib
    import json

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


ROOT_SEED = config["study"]["root_seed"]
SOURCE_SETTINGS = settings_hash(config["data"]["source"], ROOT_SEED, config["data"]["image"],
                                config["data"]["download"]["checksums"].get(config["data"]["source"]["dataset"]))
PRETRAIN_SETTINGS = settings_hash(SOURCE_SETTINGS, config["backbone"], config["pretrain"])
PROFILE_SETTINGS = settings_hash(config["profile"])


def target_settings(wildcards):
    tgt = config["data"]["targets"][wildcards.target]
    return settings_hash(tgt, config["data"]["image"], config["data"]["download"]["checksums"].get(tgt["dataset"]))


def episode_settings(wildcards):
    return settings_hash(config["data"]["targets"][wildcards.target], config["episodes"], ROOT_SEED)


def search_settings(wildcards):
    from pruneshot.stages.job import method_options

    method = METHODS[wildcards.method]
    return settings_hash(PRETRAIN_SETTINGS, config["budget"]["metric"], method_options(config, method))


def transfer_settings(wildcards):
    return settings_hash(search_settings(wildcards), config["transfer"], config["episodes"], method_arms(
        wildcards.method))


def transfer_outputs():
    return sorted({TRANSFER.format(**c) for c in cells()})


def aggregate_cells():
    """Per cell (one row of results.csv), its arm and the records aggregate reads (plain paths)."""
    out = []
    for c in cells():
        out.append({
            "arm": c["arm"],
            "transfer": TRANSFER.format(**c),
            "search": SEARCH_RECORD.format(**c),
            "profile": PROFILE.format(**c),
            "pretrain": f"results/pretrain/r{c['replicate']}/metrics.json",
        })
    return out


def final_targets():
    return [
        "results/report/index.html",
        "results/tables/results.csv",
        "results/metrics.json",
        "results/mlflow/sync.json",
    ]
