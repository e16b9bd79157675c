"""Stage search: one source-side method at one budget on the pretrained backbone."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from pruneshot.config import budget_label
from pruneshot.io import read_json, save_tensors, sha256_file, write_json
from pruneshot.stages.job import Job, checkpointer, error_text, inject_failure, run_ids, seeds_for


def load_source(manifest_path: Path) -> tuple[dict[str, Any], Any, Any]:
    """(manifest, train split, val split) of the prepared source data, normalised as the manifest says."""
    from pruneshot.data import splits as data

    manifest = read_json(manifest_path)
    norm = manifest["normalization"]
    return (manifest, data.load_split(manifest_path, "train", norm),
            data.load_split(manifest_path, "val", norm))


def _recalibrate(config: dict[str, Any], replicate: int, pretrained_weights: Path, spec: dict[str, Any],
                 pruned: Any, train: Any, val: Any) -> dict[str, Any]:
    """The shared BatchNorm recalibration of a searched network (:mod:`pruneshot.stages.calibration`),
    skipped when the search returned the pretrained network unchanged (same architecture, every tensor
    equal): it already has the recalibrated statistics of pretraining, so budget 1 stays dense, bit for bit."""
    import torch

    from pruneshot.models.base import load_model
    from pruneshot.stages.calibration import recalibrate

    if pruned.spec == spec:
        dense = load_model(str(pretrained_weights), spec).state_dict()
        now = pruned.state_dict()
        if dense.keys() == now.keys() and all(torch.equal(dense[k], now[k]) for k in dense):
            return {"applied": False, "reason": "the search returned the pretrained network unchanged"}
    return recalibrate(config, replicate, pruned, train, val)


def _retention(pruned: Any, val: Any, bn: dict[str, Any]) -> dict[str, Any]:
    """What the network handed to transfer keeps of the source task: its source validation accuracy
    (fraction; after the BN recalibration when applied) and its per-group widths (channels)."""
    from pruneshot.training import accuracy

    acc = bn["source_val_acc_after"] if bn.get("applied") else accuracy(pruned, val.x, val.y)
    return {"source_val_acc": float(acc), "widths": dict(pruned.channel_groups())}


def search(config: dict[str, Any], method_name: str, budget: float, replicate: int, manifest_path: Path,
           pretrained_weights: Path, pretrained_arch: Path, pretrained_metrics: Path,
           out_weights: Path, out_arch: Path, out_record: Path, job: Job) -> dict[str, Any]:
    """Run one method's search at one budget; save the physically pruned network and its record. A method
    with a source loop (``uses_device``) computes on ``pretrain.device``, resolved as pretraining resolves it
    (a requested but absent GPU is an error before any work); the record's ``search_device`` names the
    device used ('cpu' for a data-free search)."""
    from pruneshot.data.pipeline import resolve_device
    from pruneshot.methods import SearchContext, get_method, options_for
    from pruneshot.models.base import load_model, weights_for_save
    from pruneshot.models.cost import cost, count_flops, count_params, input_shape
    from pruneshot.seeds import seed_everything

    method = get_method(method_name)
    if method.side != "source":
        raise ValueError(f"{method_name} is a {method.side}-side method: it prunes per episode in transfer and has "
                         "no search")
    device = resolve_device(config["pretrain"].get("device", "auto"), "pretrain.device")
    used_device = str(device) if method.uses_device else "cpu"
    seeds = seeds_for(config, replicate)
    seed_everything(seeds["search"])
    pre = read_json(pretrained_metrics)
    job.check_recorded(pretrained_weights, pre.get("weights_sha256"), pretrained_metrics)
    job.check_recorded(pretrained_arch, pre.get("arch_sha256"), pretrained_metrics)
    _, train_split, val_split = load_source(manifest_path)
    spec = read_json(pretrained_arch)
    model = load_model(str(pretrained_weights), spec)
    dense_params = count_params(model)
    dense_flops = count_flops(model, input_shape(spec))
    metric = config["budget"]["metric"]
    inputs = [manifest_path, pretrained_weights, pretrained_arch]
    upstream = {"upstream_run_id": pre.get("mlflow_run_id"), "upstream_spool_id": pre.get("mlflow_spool_id")}
    params = {"method": method_name, "budget": budget, "budget_metric": metric, "replicate": replicate,
              "side": method.side}
    options = options_for(config, method)
    code = (type(method).__module__.removeprefix("pruneshot."), "methods.base", "models.base", "models.cifar",
            "models.surgery")
    ckpt = checkpointer(job, out_weights.parent, method_name, budget, metric, replicate, options, seeds,
                         job.input_hashes(inputs), used_device, modules=code)
    with job.tracked(inputs, seeds, params, upstream=pre) as run:
        import torch._dynamo  # noqa: F401  (torch.optim imports it lazily, ~2 s: keep it out of search_seconds)

        t0 = time.perf_counter()
        try:
            inject_failure("search", method_name)
            result = method.search(SearchContext(
                model=model, budget=budget, metric=metric, source_train=train_split, source_val=val_split,
                seed=seeds["search"], options=options, recipe=dict(config["pretrain"]), device=used_device,
                log=job.log, log_metrics=run.log_metrics, checkpoint=ckpt))
        except Exception as exc:  # the method failed on this cell: a failed row, not a failed DAG
            failure = error_text(exc)
            job.log(f"FAILED: {failure}\n{traceback.format_exc()}")
            run.set_tags({"pruneshot.status": "failed", "pruneshot.error": failure[:500]})
            ids = run_ids(run)
        else:
            failure = None
            seconds = time.perf_counter() - t0  # the method's own time; the shared recalibration is not in it
            pruned = result.model.eval()
            variants = [v.eval() for v in result.variants]
            if any(v.spec != pruned.spec for v in variants):
                raise ValueError(f"{method_name}: every variant network must have the main network's architecture")
            bn = _recalibrate(config, replicate, pretrained_weights, spec, pruned, train_split, val_split)
            if variants:
                bn["variants"] = [_recalibrate(config, replicate, pretrained_weights, spec, v, train_split,
                                               val_split) for v in variants]
            if bn["applied"]:
                job.log(f"BatchNorm recalibrated on {bn['images']} source images: source val acc "
                        f"{bn['source_val_acc_before']:.4f} -> {bn['source_val_acc_after']:.4f}")
            achieved = {"params": count_params(pruned), "flops": count_flops(pruned, input_shape(pruned.spec))}
            retention = _retention(pruned, val_split, bn)
            run.log_metrics({"search_seconds": seconds, "achieved_params": achieved["params"],
                             "achieved_flops": achieved["flops"],
                             "achieved_ratio": cost(pruned, metric) / (dense_params if metric == "params"
                                                                      else dense_flops)}, None)
            ids = run_ids(run)
    if failure is not None:
        # Snakemake needs every output: an empty weights file and the failure in arch and record.
        save_tensors(out_weights, {})
        write_json(out_arch, {"failed": True, "error": failure})
        record = {
            "method": method_name, "side": method.side, "method_provenance": method.provenance,
            "reference": method.reference, "replicate": replicate, "budget_metric": metric,
            "requested_budget": budget, "status": "failed", "error": failure,
            "dense_params": dense_params, "dense_flops": dense_flops, "search_device": used_device,
            "search_seconds": time.perf_counter() - t0, "weights_sha256": sha256_file(out_weights),
            "arch_sha256": sha256_file(out_arch),
            **ids, **upstream, "provenance": job.provenance(inputs, seeds, device=used_device),
        }
        write_json(out_record, record)
        ckpt.clear()
        job.log(f"{method_name} budget {budget_label(budget)}: FAILED ({failure}); recorded as a failed cell")
        return record
    save_tensors(out_weights, weights_for_save(pruned, variants))
    write_json(out_arch, pruned.spec)
    record = {
        "method": method_name, "side": method.side, "method_provenance": method.provenance,
        "reference": method.reference, "replicate": replicate,
        "budget_metric": metric, "requested_budget": budget, "status": "ok", "error": "",
        "achieved_params": achieved["params"], "achieved_flops": achieved["flops"],
        "dense_params": dense_params, "dense_flops": dense_flops,
        "params_ratio": achieved["params"] / dense_params, "flops_ratio": achieved["flops"] / dense_flops,
        "search_seconds": seconds, "search_device": used_device, "keep": result.keep, "info": result.info,
        "bn_recalibration": bn, "networks": 1 + len(variants), "source_retention": retention,
        "weights_sha256": sha256_file(out_weights), "arch_sha256": sha256_file(out_arch), **ids, **upstream,
        "provenance": job.provenance(inputs, seeds, device=used_device),
    }
    write_json(out_record, record)
    ckpt.clear()  # the outputs are complete: the checkpoint is no longer needed
    job.log(f"{method_name} budget {budget_label(budget)} ({metric}): params {achieved['params']}/"
            f"{dense_params} flops {achieved['flops']}/{dense_flops} in {seconds:.2f}s")
    return record
