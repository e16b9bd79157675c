"""Rule sync_tracking: replay MLflow records that jobs could not log live."""

from pathlib import Path

from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.tracking import sync_tracking

job = job_from_snakemake(snakemake)
summary = sync_tracking(snakemake.config, Path(snakemake.input.study), Path(snakemake.output.sync))
job.log(f"spool sync: {summary}")
