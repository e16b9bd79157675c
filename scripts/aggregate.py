"""Rule aggregate: the tidy results table, per-episode table and metrics.json."""

from pathlib import Path

from pruneshot.stages.aggregate import aggregate
from pruneshot.stages.job import job_from_snakemake

i, o = snakemake.input, snakemake.output
targets = dict(zip(snakemake.params.targets, map(Path, i.target_manifests), strict=True))
aggregate(snakemake.config, snakemake.params.cells, Path(i.source_manifest), targets, Path(o.results),
          Path(o.episodes), Path(o.metrics), job_from_snakemake(snakemake), sync_json=Path(i.sync))
