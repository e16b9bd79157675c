"""Rule sanity: the study's three sanity gates (pruneshot.report.sanity)."""

from pathlib import Path

from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.sanity import sanity

i = snakemake.input
sanity(snakemake.config, [Path(p) for p in i.transfers], [Path(p) for p in i.budget_one],
       Path(snakemake.output.gates), job_from_snakemake(snakemake))
