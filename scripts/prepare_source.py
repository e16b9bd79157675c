"""Rule prepare_source: source classes -> train/val shards + manifest."""

from pathlib import Path

from pruneshot.stages.data import prepare_source
from pruneshot.stages.job import job_from_snakemake

prepare_source(snakemake.config, Path(snakemake.output.manifest).parent, job_from_snakemake(snakemake))
