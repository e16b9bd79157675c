"""Rule prepare_select: the validation classes of transfer.select -> pool shard + manifest."""

from pathlib import Path

from pruneshot.stages.data import prepare_select
from pruneshot.stages.job import job_from_snakemake

prepare_select(snakemake.config, Path(snakemake.output.manifest).parent, job_from_snakemake(snakemake))
