"""Rule prepare_target: one target's classes -> pool shard + manifest."""

from pathlib import Path

from pruneshot.stages.data import prepare_target
from pruneshot.stages.job import job_from_snakemake

prepare_target(snakemake.config, snakemake.wildcards.target, Path(snakemake.output.manifest).parent,
               job_from_snakemake(snakemake))
