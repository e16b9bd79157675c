"""Rule select_transfer: one network's transfer settings chosen on the validation episodes."""

from pathlib import Path

from pruneshot.runtime.gpus import lease_for_job
from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.select import select_transfer

w, i = snakemake.wildcards, snakemake.input
job = job_from_snakemake(snakemake)
with lease_for_job(snakemake.resources, log=job.log):  # a free GPU when the job requests one
    select_transfer(snakemake.config, w.method, list(snakemake.params.arms), int(w.shots), int(w.replicate),
                    float(w.budget), Path(i.weights), Path(i.arch), Path(i.network_record), Path(i.source_manifest),
                    Path(i.select_manifest), Path(i.episodes), Path(snakemake.output.record), job)
