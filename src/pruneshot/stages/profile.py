"""Stage profile: measured latency of a pruned network on the CPU and, when present, CUDA."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pruneshot.io import read_json, sha256_file, write_json
from pruneshot.seeds import derive_seed
from pruneshot.stages.job import Job


def profile(config: dict[str, Any], weights: Path, arch: Path, out: Path, job: Job,
            adapted: Path | None = None) -> dict[str, Any]:
    """Measured latency of the pruned network at each configured batch size on each of
    ``profile.devices``: the CPU (``profile.threads`` threads) and, when present, CUDA (synchronised
    around every timed pass). Both time float32 forward passes in contiguous memory format. A
    configured CUDA that is absent is recorded as not present with the reason, never an error.
    The top-level ``device``/``dtype``/``threads``/``latency`` keys describe the CPU timing (None/{}
    when the CPU is not among the devices); ``devices`` has one entry per configured device.

    ``adapted``: for a target-side method, a transfer record whose per-episode networks differ;
    the one with the median parameter count is timed (its architecture, with seeded weights:
    the timing of dense float32 layers does not depend on the weight values)."""
    import torch

    from pruneshot.data.pipeline import cuda_absence_reason
    from pruneshot.models.base import build_seeded, load_model
    from pruneshot.models.cost import input_shape
    from pruneshot.models.latency import measure_latency
    from pruneshot.runtime.provenance import device_name

    pc = config["profile"]
    torch.set_num_threads(pc["threads"])
    inputs = [weights, arch]
    network: dict[str, Any] = {"from": "search"}
    arch_rec = read_json(arch)
    failure = f"search failed: {arch_rec['error']}" if arch_rec.get("failed") else None
    if failure is None and adapted is not None and read_json(adapted).get("status") == "failed":
        failure = f"transfer failed: {read_json(adapted)['error']}"
    if failure is not None:  # nothing to time: the cell is a failed row
        record = {"status": "failed", "error": failure, "device": None, "dtype": "float32", "threads": None,
                  "latency": {}, "batch_sizes": [int(b) for b in pc["batch_sizes"]], "devices": {},
                  "network": None, "weights_sha256": sha256_file(weights),
                  "provenance": job.provenance(inputs + ([adapted] if adapted else []), {})}
        write_json(out, record)
        job.log(f"not timed: {failure}")
        return record
    if adapted is None:
        spec = read_json(arch)
        model = load_model(str(weights), spec)
    else:
        eps = sorted(read_json(adapted)["adapted"], key=lambda a: (a["params"], a["episode"]))
        chosen = eps[(len(eps) - 1) // 2]
        spec = chosen["spec"]
        model = build_seeded(spec, derive_seed(config["study"]["root_seed"], "profile", chosen["episode"]))
        network = {"from": "per-episode target-side pruning (median params)", "transfer_record": str(adapted),
                    "episode": chosen["episode"], "params": chosen["params"], "flops": chosen["flops"],
                    "weights": "seeded initialisation"}
        inputs.append(adapted)
        job.log(f"timing the median-size episode network (episode {chosen['episode']}, {chosen['params']} params)")
    model.eval()
    batch_sizes = [int(b) for b in pc["batch_sizes"]]
    devices: dict[str, dict[str, Any]] = {}
    for dev in pc.get("devices", ["cpu", "cuda"]):
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"profile.devices: unknown device {dev!r}; allowed: cpu, cuda")
        if dev == "cuda" and not torch.cuda.is_available():
            devices[dev] = {"present": False, "reason": cuda_absence_reason()}
            job.log(f"cuda: not present ({devices[dev]['reason']}); not timed")
            continue
        timed = model if dev == "cpu" else copy.deepcopy(model)  # measure_latency moves the model
        results = {}
        for bs in batch_sizes:
            results[str(bs)] = measure_latency(timed, input_shape(spec), bs, device=dev, warmup=pc["warmup"],
                                               repeats=pc["repeats"])
            job.log(f"{dev} batch {bs}: median {results[str(bs)]['median_ms']:.3f} ms")
        devices[dev] = {"present": True, "name": device_name(dev), "dtype": "float32", "latency": results,
                        **({"threads": torch.get_num_threads()} if dev == "cpu" else {})}
        if dev == "cuda":
            del timed
            torch.cuda.empty_cache()
    cpu = devices.get("cpu", {})
    record = {"status": "ok", "device": cpu.get("name"), "dtype": "float32", "threads": cpu.get("threads"),
              "latency": cpu.get("latency", {}), "batch_sizes": batch_sizes, "devices": devices,
              "network": network, "weights_sha256": sha256_file(weights),
              "provenance": job.provenance(inputs, {})}
    write_json(out, record)
    return record
