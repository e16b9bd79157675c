"""Rule budget_one: every method at budget 1.0 compared with the dense network (sanity gate c)."""

from pathlib import Path

from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.sanity import budget_one

i = snakemake.input
budget_one(snakemake.config, int(snakemake.wildcards.replicate), Path(i.manifest), Path(i.weights), Path(i.arch),
           Path(i.target_manifest), Path(i.episodes), Path(snakemake.output.record), job_from_snakemake(snakemake),
           pretrained_metrics=Path(i.metrics))
