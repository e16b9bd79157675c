"""Rule pretrain: the backbone on the source classes."""

from pathlib import Path

from pruneshot.runtime.gpus import lease_for_job
from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.pretrain import pretrain

out = snakemake.output
job = job_from_snakemake(snakemake)
with lease_for_job(snakemake.resources, log=job.log):  # a free GPU when the job requests one
    pretrain(snakemake.config, int(snakemake.wildcards.replicate), Path(snakemake.input.manifest),
             Path(out.weights), Path(out.arch), Path(out.metrics), job)
