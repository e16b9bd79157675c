"""Stages prepare_source, prepare_target and make_episodes: the study's data and its fixed episodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruneshot.io import read_json, write_json
from pruneshot.seeds import derive_seed
from pruneshot.stages.job import Job


def prepare_source(config: dict[str, Any], out_dir: Path, job: Job) -> dict[str, Any]:
    """Source classes -> train/val shards + manifest.

    Downloads (cache ``data.cache_dir``, settings ``data.download``) or reads the source dataset,
    converts it to ``data.image`` and writes ``out_dir`` atomically (nothing on failure)."""
    from pruneshot.data import prepare as data

    src = config["data"]["source"]
    raw = data.load_entry(src, "source", config["data"])
    seed = derive_seed(config["study"]["root_seed"], "data", "source_val")
    manifest = data.prepare_source(raw, src["classes"], src["val_fraction"], seed, out_dir,
                                   image=config["data"].get("image"),
                                   provenance=job.provenance([], {"split_seed": seed}))
    job.log(f"source {src['dataset']} ({manifest['split']}) classes {src['classes']}: "
            f"{manifest['splits']['train']['n']} train / {manifest['splits']['val']['n']} val, "
            f"images {manifest['image_shape']} (native {manifest['native_shape']})")
    return manifest


def prepare_target(config: dict[str, Any], target: str, out_dir: Path, job: Job) -> dict[str, Any]:
    """Target classes -> one pool shard + manifest (data handling as in :func:`prepare_source`)."""
    from pruneshot.data import prepare as data

    tgt = config["data"]["targets"][target]
    raw = data.load_entry(tgt, "target", config["data"])
    manifest = data.prepare_target(raw, tgt["classes"], out_dir, image=config["data"].get("image"),
                                   provenance=job.provenance([], {}))
    job.log(f"target {target}: {tgt['dataset']} ({manifest['split']}), {manifest['splits']['pool']['n']} images, "
            f"classes {tgt['classes']}, images {manifest['image_shape']} (native {manifest['native_shape']})")
    return manifest


def prepare_select(config: dict[str, Any], out_dir: Path, job: Job) -> dict[str, Any]:
    """The validation classes of ``transfer.select.data`` -> one pool shard + manifest (as a target's)."""
    from pruneshot.data import prepare as data

    entry = config["transfer"]["select"]["data"]
    raw = data.load_entry(entry, "target", config["data"])  # split default: test, as a target's
    manifest = data.prepare_target(raw, entry["classes"], out_dir, image=config["data"].get("image"),
                                   provenance=job.provenance([], {}))
    job.log(f"selection classes: {entry['dataset']} ({manifest['split']}), {manifest['splits']['pool']['n']} "
            f"images, classes {entry['classes']}, images {manifest['image_shape']}")
    return manifest


def make_episodes(config: dict[str, Any], target: str, ways: int, shots: int, manifest_path: Path,
                  out: Path, job: Job, count: int | None = None) -> None:
    """Sample and save the fixed episodes of (target, ways, shots): ``count`` of them (None:
    ``episodes.count``). ``target`` also names the episode seeds' axis."""
    from pruneshot.data.episodes import content_sha256
    from pruneshot.data.episodes import make_episodes as sample
    from pruneshot.io import load_tensors

    manifest = read_json(manifest_path)
    pool_path = Path(manifest_path).parent / manifest["splits"]["pool"]["file"]
    labels = load_tensors(pool_path)["y"].numpy()
    ep_cfg = config["episodes"]
    episodes = sample(labels, ways=ways, shots=shots, count=ep_cfg["count"] if count is None else count,
                      queries_per_class=ep_cfg["queries_per_class"],
                      root_seed=config["study"]["root_seed"], target=target)

    payload = {"target": target, "ways": ways, "shots": shots, "queries_per_class": ep_cfg["queries_per_class"],
               "pool_sha256": manifest["splits"]["pool"]["sha256"], "episodes": episodes}
    write_json(out, {**payload, "content_sha256": content_sha256(payload),
                     "provenance": job.provenance([manifest_path], {"episode_root": config["study"]["root_seed"]})})
    job.log(f"{len(episodes)} episodes {ways}-way {shots}-shot for {target}")
