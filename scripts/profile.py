"""Rule profile: measured latency of one pruned network."""

from pathlib import Path

from pruneshot.stages import job_from_snakemake, profile

i = snakemake.input
adapted = Path(i.adapted) if "adapted" in i.keys() else None
profile(snakemake.config, Path(i.weights), Path(i.arch), Path(snakemake.output.record),
        job_from_snakemake(snakemake), adapted=adapted)
