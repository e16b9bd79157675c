# Config look-ups and target lists; rules stay declarative.
import functools

from pruneshot.config import budget_label, config_hash
from pruneshot.methods import get_method, options_for
from pruneshot.paths import for_config
from pruneshot.runtime.gpus import uses_gpu
from pruneshot.runtime.metadata import restore as restore_metadata
from pruneshot.runtime.provenance import git_state

# The git state travels to every job through the environment, never through params
# (a commit in params would rerun everything on every commit).
_commit, _dirty = git_state(workflow.basedir)
os.environ.setdefault("PRUNESHOT_GIT_COMMIT", _commit)
os.environ.setdefault("PRUNESHOT_GIT_DIRTY", "1" if _dirty else "0")
CONFIG_SHA256 = config_hash(config)

# Every path is a template of pruneshot.paths below this study's roots, results/<study.name>/ and
# logs/<study.name>/: two configs in one checkout never touch each other's outputs.
PATHS = for_config(config)
R, LOG, BENCH = PATHS.result, PATHS.log, PATHS.benchmark
# Snakemake's job records of pulled results (DVC carries them in results/<study>/): a changed setting
# reruns what reads it in any checkout. Records this checkout has are kept (pruneshot.runtime.metadata).
restore_metadata(R("snakemake_metadata"))

METHODS = {name: get_method(name) for name in config["methods"]}
SOURCE_SIDE = [m for m, method in METHODS.items() if method.side == "source"]
TARGET_SIDE = [m for m, method in METHODS.items() if method.side == "target"]
BUDGETS = [budget_label(b) for b in config["budget"]["levels"]]
REPLICATES = list(range(config["study"]["replicates"]))
TARGETS = list(config["data"]["targets"])
SHOTS = [int(s) for s in config["episodes"]["shots"]]
WAYS = int(config["episodes"]["ways"])


def method_budgets(method):
    """Budget labels a method runs at: budget-free methods only at 1."""
    return ["1"] if METHODS[method].budget_free else BUDGETS


def method_arms(method):
    return METHODS[method].study_arms(config["transfer"])


def networks():
    """(method, budget, replicate) of every network a method is evaluated at."""
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
    """A regex matching exactly ``values`` (one that matches nothing when there are none)."""
    values = sorted({str(v).replace(".", r"\.") for v in values})
    return "|".join(values) if values else "(?!)"


wildcard_constraints:
    method=_alts(METHODS),
    budget=_alts(BUDGETS + ["1"]),
    replicate=_alts(REPLICATES),
    target=_alts(TARGETS),
    shots=_alts(SHOTS),
    ways=_alts([WAYS]),


SELECT = config["transfer"]["select"]  # None: every method transfers with transfer.lr and transfer.steps


def selection_inputs(wildcards):
    """The transfer job's chosen settings (transfer.select), none when the settings are fixed."""
    if not SELECT:
        return {}
    w = dict(wildcards.items())
    return {"selection": R("selection", method=w["method"], budget=w["budget"], shots=w["shots"],
                           replicate=w["replicate"])}


def selection_outputs():
    return sorted({R("selection", method=m, budget=b, shots=s, replicate=r) for (m, b, r) in networks()
                   for s in SHOTS}) if SELECT else []


def search_threads(wildcards):
    """A search trains on one thread, but a method that trains its network anew on the source (scratch)
    gets the pretraining recipe's threads: float sums depend on the thread count."""
    return config["pretrain"]["threads"] if METHODS[wildcards.method].trains_from_scratch else 1


@functools.cache
def gpu_request(setting):
    """The ``gpu`` resource of a job whose device setting is ``setting`` (auto|cpu|cuda): 1 when the job will
    use CUDA on this node ('cuda', or 'auto' on a node with a GPU: pruneshot.runtime.gpus.uses_gpu, decided
    without torch), else 0. A job requesting one leases its own free device (scripts: lease_for_job), so
    `--cores N --resources gpu=K` runs at most K GPU jobs at once, each on its own device."""
    return 1 if uses_gpu(setting) else 0


def search_gpu(wildcards):
    """A search computes on pretrain.device, unless the method's search is data-free (``uses_device``
    False: weights only, on the CPU)."""
    return gpu_request(config["pretrain"]["device"]) if METHODS[wildcards.method].uses_device else 0


# profile.devices' cuda is timed where the node has one (else recorded as absent): as device 'auto'.
PROFILE_DEVICE = "auto" if "cuda" in config["profile"]["devices"] else "cpu"


def network_paths(w):
    """The network a cell (wildcards ``w``, a dict) starts from: a source-side method's searched
    network, or for a target-side method (which prunes per episode) the pretrained backbone;
    ``network_record`` is the record describing it (search record, pretrain metrics)."""
    if METHODS[w["method"]].side == "target":
        keys = ("pretrain_weights", "pretrain_arch", "pretrain_metrics")
    else:
        keys = ("search_weights", "search_arch", "search_record")
    return dict(zip(("weights", "arch", "network_record"), (R(k, **w) for k in keys), strict=True))


def profile_record(cell):
    """The latency record of a cell's network: per network (source side), per cell (target side)."""
    if METHODS[cell["method"]].side == "target":
        return R("profile_adapted", **cell)
    return R("profile", **cell)


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
PRETRAIN_SETTINGS = settings_hash(SOURCE_SETTINGS, config["backbone"], config["pretrain"], config["bn_recalibration"])
PROFILE_SETTINGS = settings_hash(config["profile"])


def target_settings(wildcards):
    tgt = config["data"]["targets"][wildcards.target]
    return settings_hash(tgt, config["data"]["image"], config["data"]["download"]["checksums"].get(tgt["dataset"]))


def episode_settings(wildcards):
    return settings_hash(config["data"]["targets"][wildcards.target], config["episodes"], ROOT_SEED)


def search_settings(wildcards):
    method = METHODS[wildcards.method]
    return settings_hash(PRETRAIN_SETTINGS, config["budget"]["metric"], options_for(config, method))


def select_data_settings(wildcards):
    return settings_hash(SELECT and SELECT["data"], config["data"]["image"], ROOT_SEED)


def select_episode_settings(wildcards):
    return settings_hash(SELECT, config["episodes"], ROOT_SEED)


def _transfer_section():
    """config["transfer"] as the jobs' settings hash sees it: dense_only_arms acts only through each
    job's own arms (hashed beside it), so adding it leaves other methods' cells as they were."""
    return {k: v for k, v in config["transfer"].items() if k != "dense_only_arms"}


def select_settings(wildcards):
    return settings_hash(search_settings(wildcards), _transfer_section(), config["episodes"], method_arms(
        wildcards.method))


def transfer_settings(wildcards):
    return settings_hash(search_settings(wildcards), _transfer_section(), config["episodes"], method_arms(
        wildcards.method))


def transfer_outputs():
    return sorted({R("transfer", **c) for c in cells()})


def profile_outputs():
    return sorted({profile_record(c) for c in cells()})


def aggregate_cells():
    """Per cell (one row of results.csv), its arm and the records aggregate reads (plain paths)."""
    return [
        {
            "arm": c["arm"],
            "transfer": R("transfer", **c),
            "network": network_paths(c)["network_record"],
            "profile": profile_record(c),
            "pretrain": R("pretrain_metrics", **c),
        }
        for c in cells()
    ]


def sanity_transfers():
    """The transfer records the sanity gates read: every dense cell and every other budget-1.0 cell."""
    return sorted({R("transfer", **c) for c in cells() if c["method"] == "dense" or c["budget"] == "1"})


def final_targets():
    keys = ("report_html", "results_csv", "metrics_json", "sync_json", "finish_json") + (
        ("selection_csv",) if SELECT else ())
    return [R(key) for key in keys]
