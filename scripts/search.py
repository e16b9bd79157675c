"""Rule search: one method at one budget on the pretrained backbone."""

from pathlib import Path

from pruneshot.runtime.gpus import lease_for_job
from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.search import search

w, i, o = snakemake.wildcards, snakemake.input, snakemake.output
job = job_from_snakemake(snakemake)
with lease_for_job(snakemake.resources, log=job.log):  # a free GPU when the job requests one
    search(snakemake.config, w.method, float(w.budget), int(w.replicate), Path(i.manifest), Path(i.weights),
           Path(i.arch), Path(i.metrics), Path(o.weights), Path(o.arch), Path(o.record), job)
