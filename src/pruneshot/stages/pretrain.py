"""Stage pretrain: the backbone trained on the source classes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pruneshot.io import read_json, save_tensors, sha256_file, write_json
from pruneshot.runtime.provenance import process_age_s
from pruneshot.stages.job import Job, checkpointer, run_ids, seeds_for


def pretrain(config: dict[str, Any], replicate: int, manifest_path: Path, out_weights: Path,
             out_arch: Path, out_metrics: Path, job: Job) -> dict[str, Any]:
    """Train the backbone on the source classes; keep the best-validation epoch. Runs on
    ``pretrain.device`` (a requested but absent GPU is an error before any work) with the data held
    there as uint8; what was applied (device name, amp, channels_last, augment) goes into the
    record and the MLflow params."""
    from pruneshot.data.pipeline import Augment, BatchSource, load_raw_split, resolve_device
    from pruneshot.models.base import backbone_spec, build_model, state_dict_for_save
    from pruneshot.models.cost import count_flops, count_params, input_shape
    from pruneshot.seeds import seed_everything
    from pruneshot.training import device_description
    from pruneshot.training import pretrain as train

    pc = config["pretrain"]
    device = resolve_device(pc.get("device", "auto"), "pretrain.device")  # a missing GPU fails before any work
    on_cuda = device.type == "cuda"
    channels_last = bool(pc.get("channels_last", True)) and on_cuda
    amp = pc.get("amp", "none")
    augment = Augment.from_config(pc.get("augment"))
    seeds = seeds_for(config, replicate)
    seed_everything(seeds["pretrain"])
    manifest = read_json(manifest_path)
    # uint8 images held on the training device, normalised (and augmented) there per batch
    train_split, val_split = (BatchSource.from_raw(load_raw_split(manifest_path, split), manifest["normalization"],
                                                   device=device, channels_last=channels_last)
                              for split in ("train", "val"))
    c, h, _ = manifest["image_shape"]
    bb = config["backbone"]
    model = build_model(backbone_spec(bb, c, h, len(manifest["classes"])))
    applied = {"pretrain.device_used": str(device), "pretrain.device_name": device_description(device),
               "pretrain.amp_used": amp if on_cuda else "none", "pretrain.channels_last_used": channels_last}
    params = {**{f"pretrain.{k}": v for k, v in pc.items() if not isinstance(v, dict)},
              **{f"pretrain.augment.{k}": v for k, v in (pc.get("augment") or {}).items()}, **applied,
              "backbone": bb["name"],
              **{f"backbone.{k}": v for k, v in bb.items() if k != "name"}, "replicate": replicate}
    ckpt = checkpointer(job, out_weights.parent, "pretrain", replicate, pc, bb, seeds, str(device),
                         job.input_hashes([manifest_path]),
                         modules=("training", "data.pipeline", "models.base", "models.cifar"))
    t0 = time.perf_counter()
    with job.tracked([manifest_path], seeds, params) as run:
        import torch

        # A setting, not the job's core reservation: float sums depend on the thread count.
        torch.set_num_threads(pc["threads"])
        overhead = process_age_s()
        job.log(f"process start to first training step: {overhead}s; device {applied['pretrain.device_name']}, "
                f"amp {applied['pretrain.amp_used']}, channels_last {channels_last}, augment {augment}")
        model, info = train(model, train_split, val_split, epochs=pc["epochs"], batch_size=pc["batch_size"],
                            lr=pc["lr"], momentum=pc["momentum"], weight_decay=pc["weight_decay"],
                            patience=pc["patience"], seed=seeds["pretrain"], augment=augment, device=device,
                            amp=amp, channels_last=channels_last, log=job.log,
                            log_metrics=run.log_metrics, checkpoint=ckpt)
        seconds = time.perf_counter() - t0
        # the dense network every search starts from gets the statistics every searched network gets
        from pruneshot.data import splits
        from pruneshot.stages.calibration import recalibrate

        norm = manifest["normalization"]
        bn = recalibrate(config, replicate, model, splits.load_split(manifest_path, "train", norm),
                         splits.load_split(manifest_path, "val", norm))
        if bn["applied"]:
            job.log(f"BatchNorm recalibrated on {bn['images']} source images: source val acc "
                    f"{bn['source_val_acc_before']:.4f} -> {bn['source_val_acc_after']:.4f}")
        run.log_metrics({"best_val_acc": info["best_val_acc"], "seconds": seconds,
                         **({"val_acc_recalibrated": bn["source_val_acc_after"]} if bn["applied"] else {})}, None)
        ids = run_ids(run)
    save_tensors(out_weights, state_dict_for_save(model))
    write_json(out_arch, model.spec)
    record = {
        "replicate": replicate, "best_epoch": info["best_epoch"], "best_val_acc": info["best_val_acc"],
        "epochs_run": info["epochs_run"], "history": info["history"], "seconds": seconds,
        "resumed_after_epoch": info["resumed_after_epoch"], "seconds_before_resume": info["seconds_before_resume"],
        "overhead_s": overhead, "applied": info["applied"], "bn_recalibration": bn,
        "params": count_params(model), "flops": count_flops(model, input_shape(model.spec)),
        "weights_sha256": sha256_file(out_weights), "arch_sha256": sha256_file(out_arch), **ids,
        "provenance": job.provenance([manifest_path], seeds, device=str(device)),
    }
    write_json(out_metrics, record)
    ckpt.clear()  # the outputs are complete: the checkpoint is no longer needed
    return record
