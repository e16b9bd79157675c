"""Rule profile: measured latency of one pruned network."""

from pathlib import Path

from pruneshot.runtime.gpus import lease_for_job
from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.profile import profile

i = snakemake.input
adapted = getattr(i, "adapted", None)  # only target-side methods have it
adapted = Path(adapted) if adapted else None
job = job_from_snakemake(snakemake)
with lease_for_job(snakemake.resources, log=job.log):  # a free GPU when the job requests one
    profile(snakemake.config, Path(i.weights), Path(i.arch), Path(snakemake.output.record), job, adapted=adapted)
