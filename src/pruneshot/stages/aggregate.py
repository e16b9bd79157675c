"""Stage aggregate: every transfer cell into the tidy results table, the per-episode table and
metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pruneshot.config import budget_label
from pruneshot.io import read_json, sha256_file, write_json
from pruneshot.report.load import latency_columns
from pruneshot.stages.job import Job
from pruneshot.stages.tracking import mlflow_run_id


def _row_id(*parts: object) -> str:
    import hashlib

    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:10]


def _network(method: Any, rec: dict[str, Any], transfer: dict[str, Any], metric: str) -> dict[str, Any]:
    """The network columns of a cell: a source-side method's search record as it is; for a target-side
    method (no search) the same fields from the transfer record (dense cost counted on the loaded
    pretrained network, its weights hash, the device its ``adapt`` ran on as ``search_device``: the record's
    ``adapt_device``, 'cpu' for records without one) and the budget it was asked for."""
    if method.side == "source":
        return rec
    nan = float("nan")
    return {"status": "ok", "budget_metric": metric, "requested_budget": transfer["requested_budget"],
            "dense_params": transfer.get("dense_params", nan), "dense_flops": transfer.get("dense_flops", nan),
            "search_device": transfer.get("adapt_device", "cpu"), "weights_sha256": transfer["weights_sha256"]}


def _dig(info: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(info, dict) or part not in info:
            return None
        info = info[part]
    return info


def mechanism_figures(method: Any, network: dict[str, Any], transfer: dict[str, Any]) -> dict[str, float]:
    """The method's ``mechanism`` info values for one cell: from its search record (source side) or the
    mean over the cell's per-episode ``adapted`` entries (target side); keys that are absent or not
    numbers are left out."""
    import math

    infos = [network.get("info") or {}] if method.side == "source" else [a.get("info") or {}
                                                                          for a in transfer.get("adapted", [])]
    out = {}
    for key in method.mechanism:
        vals = [v for v in (_dig(i, key) for i in infos) if isinstance(v, int | float) and not isinstance(v, bool)
                and math.isfinite(v)]
        if vals:
            out[key] = round(sum(vals) / len(vals), 6)
    return out


def bn_statistics(side: str, network: dict[str, Any], pretrain: dict[str, Any]) -> str:
    """Where a cell's BatchNorm statistics come from: 'recalibrated after search' (a searched network,
    re-estimated on the shared source images), 'pretrained, recalibrated' (the pretrained network's, itself
    recalibrated on them) or 'pretrained' (bn_recalibration disabled, or a record from before it)."""
    search = network.get("bn_recalibration") or {} if side == "source" else {}
    if search.get("applied"):
        return "recalibrated after search"
    return "pretrained, recalibrated" if (pretrain.get("bn_recalibration") or {}).get("applied") else "pretrained"


def metrics_summary(rows: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """metrics.json: a summary small enough for ``dvc metrics show``, which prints one table row per
    metrics file and one column per leaf (header: the dotted key path).

    ``rows.ok``/``rows.failed`` count the results rows; ``failed.<method>`` (only when rows failed) counts
    a method's failed rows. ``<method>.<k>shot`` is the headline accuracy: acc_mean of the method's ok rows
    at its tightest budget on the first of ``arms`` it ran, averaged over targets and replicates, so
    there is one column per (method, shots) however many budgets, arms, targets and replicates the
    study has. ``headline.arm``/``headline.budget`` name that arm and the tightest budget of the study;
    a method whose arm or budget differs says so in ``<method>.arm``/``<method>.budget``. Strict JSON."""
    import math

    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {"rows": {"ok": len(ok), "failed": len(rows) - len(ok)}}
    failed: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            failed[r["method"]] = failed.get(r["method"], 0) + 1
    if failed:
        out["failed"] = dict(sorted(failed.items()))
    if not ok:
        return out
    headline = {"arm": arms[0], "budget": min(r["requested_budget"] for r in ok)}
    out["headline"] = headline
    for method in sorted({r["method"] for r in ok}):
        mine = [r for r in ok if r["method"] == method]
        budget = min(r["requested_budget"] for r in mine)
        ran = {r["arm"] for r in mine if r["requested_budget"] == budget}
        arm = next((a for a in arms if a in ran), min(ran))
        accs: dict[int, list[float]] = {}
        for r in mine:
            if r["requested_budget"] == budget and r["arm"] == arm and math.isfinite(r["acc_mean"]):
                accs.setdefault(int(r["shots"]), []).append(r["acc_mean"])
        entry: dict[str, Any] = {f"{k}shot": round(sum(v) / len(v), 4) for k, v in sorted(accs.items())}
        if arm != headline["arm"]:
            entry["arm"] = arm
        if budget != headline["budget"]:
            entry["budget"] = budget
        out[method] = entry
    return out


def aggregate(config: dict[str, Any], cells: list[dict[str, Any]], source_manifest: Path,
              target_manifests: dict[str, Path], out_csv: Path, out_episodes_csv: Path,
              out_metrics: Path, job: Job, sync_json: Path | None = None) -> list[dict[str, Any]]:
    """Collect every transfer cell into one tidy table (one row per method, budget, target, shots,
    arm, replicate), a long per-episode table, and metrics.json for ``dvc metrics show``.

    ``cells`` items: {"arm": name, "transfer": path, "network": path, "profile": path, "pretrain": path};
    ``network`` is the search record of a source-side method's network and the pretrain metrics for a
    target-side method (whose networks are pruned per episode and described by the transfer record).
    A method's side and source come from the method registry. ``sync_json`` (sync_tracking's output)
    gives the MLflow run ids of records logged after their job (``mlflow.live: false``).
    """
    import pandas as pd

    from pruneshot.methods import get_method

    data_sha = {"source": sha256_file(source_manifest),
                **{t: sha256_file(p) for t, p in target_manifests.items()}}
    runs = read_json(sync_json).get("runs", {}) if sync_json is not None else {}
    rows, episode_rows = [], []
    cache: dict[str, dict[str, Any]] = {}

    def load(path: Any) -> dict[str, Any]:
        if str(path) not in cache:
            cache[str(path)] = read_json(path)
        return cache[str(path)]

    checked: set[str] = set()
    for cell in cells:
        job_rec, pr, pre = load(cell["transfer"]), load(cell["profile"]), load(cell["pretrain"])
        if str(cell["transfer"]) not in checked:  # the network record must be the one the transfer job read
            checked.add(str(cell["transfer"]))
            recorded, actual = job_rec.get("network_record_sha256"), sha256_file(cell["network"])
            if recorded is not None and recorded != actual:
                raise ValueError(f"input {cell['network']} has sha256 {actual}, but {cell['transfer']} recorded "
                                 f"{recorded} for it: the record changed after the transfer job read it "
                                 "(corrupted or edited); rerun the jobs that wrote them")
        arm = cell["arm"]
        method = get_method(job_rec["method"])
        se = _network(method, load(cell["network"]), job_rec, config["budget"]["metric"])
        failed = job_rec.get("status") == "failed"
        tr = {**job_rec, **job_rec["arms"][arm], "arm": arm}
        prov = tr["provenance"]
        seeds = prov["seeds"]
        row_id = _row_id(tr["method"], budget_label(tr["requested_budget"]), tr["target"], tr["ways"],
                         tr["shots"], arm, tr["replicate"], prov["config_sha256"], prov["git_commit"])
        nan = float("nan")
        if se.get("status") == "failed":  # no network: no cost either
            cost_cols = {k: nan for k in ("achieved_params", "achieved_flops", "params_ratio", "flops_ratio")}
            cost_cols |= {"search_seconds": se["search_seconds"], "search_scope": "once"}
        elif "achieved" in tr:  # target-side: pruned per episode, cost averaged over this cell's episodes
            ach = tr["achieved"]
            cost_cols = {
                "achieved_params": ach["params"], "achieved_flops": ach["flops"],
                "params_ratio": ach["params"] / se["dense_params"], "flops_ratio": ach["flops"] / se["dense_flops"],
                "search_seconds": ach["adapt_seconds_mean"], "search_scope": "per episode",
            }
        elif failed and method.side == "target":  # per-episode pruning never finished
            cost_cols = {k: nan for k in ("achieved_params", "achieved_flops", "params_ratio", "flops_ratio")}
            cost_cols |= {"search_seconds": nan, "search_scope": "per episode"}
        else:
            cost_cols = {
                "achieved_params": se["achieved_params"], "achieved_flops": se["achieved_flops"],
                "params_ratio": se["params_ratio"], "flops_ratio": se["flops_ratio"],
                "search_seconds": se["search_seconds"], "search_scope": "once",
            }
        cost_cols["budget_gap"] = se["requested_budget"] - cost_cols[f"{se['budget_metric']}_ratio"]
        tolerance = config["budget"]["tolerance"]
        cost_cols["budget_missed"] = bool(abs(cost_cols["budget_gap"]) > tolerance)  # NaN (no network): False
        summary = tr.get("summary") or {"mean": nan, "ci95": nan, "std": nan, "n": 0}
        row = {
            "row_id": row_id, "method": tr["method"], "method_source": method.provenance,
            "side": method.side, "backbone": config["backbone"]["name"],
            "source": config["data"]["source"]["dataset"], "target": tr["target"], "ways": tr["ways"],
            "shots": tr["shots"], "arm": tr["arm"], "budget_metric": se["budget_metric"],
            "requested_budget": se["requested_budget"], "achieved_params": cost_cols["achieved_params"],
            "achieved_flops": cost_cols["achieved_flops"], "dense_params": se["dense_params"],
            "dense_flops": se["dense_flops"], "params_ratio": cost_cols["params_ratio"],
            "flops_ratio": cost_cols["flops_ratio"], "budget_gap": cost_cols["budget_gap"],
            "budget_missed": cost_cols["budget_missed"], "budget_tolerance": tolerance,
            **latency_columns(pr),
            "search_seconds": cost_cols["search_seconds"], "search_scope": cost_cols["search_scope"],
            "search_device": se["search_device"],
            "acc_mean": summary["mean"], "acc_ci95": summary["ci95"],
            "acc_std": summary["std"], "n_episodes": summary["n"],
            "support_steps": tr.get("support_steps", nan), "transfer_lr": tr.get("lr", nan),
            "transfer_settings": tr.get("settings", "fixed"), "bn_statistics": bn_statistics(method.side, se, pre),
            # source retention of the transferred network (source-side; target-side prune per episode)
            "source_val_acc": (se.get("source_retention") or {}).get("source_val_acc", nan),
            "widths": json.dumps((se.get("source_retention") or {}).get("widths", {}), sort_keys=True),
            "mechanism": json.dumps(mechanism_figures(method, se, tr)) if not failed else "{}",
            # several networks per cell (random's masks): acc_mean is over their per-episode mean
            "networks": len(tr.get("network_means") or [None]),
            "network_acc_min": min(tr["network_means"]) if tr.get("network_means") else nan,
            "network_acc_max": max(tr["network_means"]) if tr.get("network_means") else nan,
            "replicate": tr["replicate"], "seed_pretrain": seeds["pretrain"], "seed_search": seeds["search"],
            "seed_episode": seeds["episode_root"],
            "seed_finetune": tr["episodes"][0]["finetune_seed"] if tr["episodes"] else "",
            "git_commit": prov["git_commit"], "git_dirty": prov["git_dirty"],
            "config_sha256": prov["config_sha256"], "data_sha256": data_sha[tr["target"]],
            "checkpoint_sha256": se["weights_sha256"], "pretrain_sha256": pre["weights_sha256"],
            "mlflow_run_id": mlflow_run_id(tr, runs), "status": "failed" if failed else "ok",
            "error": tr.get("error", "") if failed else "",
            "transfer_record": str(cell["transfer"]),
            "transfer_seconds": tr["seconds"],
        }
        rows.append(row)
        episode_rows += [{"row_id": row_id, "episode": e["episode"], "accuracy": e["accuracy"]}
                         for e in tr["episodes"]]
    order = ["method", "requested_budget", "target", "shots", "arm", "replicate"]
    table = pd.DataFrame(rows).sort_values(order, ascending=[True, False, True, True, True, True])
    from pruneshot.io import atomic_path

    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_episodes_csv) as tmp:
        pd.DataFrame(episode_rows).to_csv(tmp, index=False)
    metrics = metrics_summary(rows, config["transfer"]["arms"])
    write_json(out_metrics, metrics)
    job.log(f"aggregated {len(rows)} cells, {len(episode_rows)} episode results")
    return rows
