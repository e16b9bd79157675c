"""Rule transfer: fine-tune and score one network on every saved episode, under every arm."""

from pathlib import Path

from pruneshot.runtime.gpus import lease_for_job
from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.transfer import transfer

w, i = snakemake.wildcards, snakemake.input
job = job_from_snakemake(snakemake)
with lease_for_job(snakemake.resources, log=job.log):  # a free GPU when the job requests one
    transfer(snakemake.config, w.method, list(snakemake.params.arms), int(w.shots), w.target, int(w.replicate),
             float(w.budget), Path(i.weights), Path(i.arch), Path(i.network_record), Path(i.source_manifest),
             Path(i.target_manifest), Path(i.episodes), Path(snakemake.output.record), job,
             selection=Path(i.selection) if hasattr(i, "selection") else None)
