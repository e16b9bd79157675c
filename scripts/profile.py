"""Rule profile: measured latency of one pruned network."""

from pathlib import Path

from pruneshot.stages import job_from_snakemake, profile

i = snakemake.input
adapted = getattr(i, "adapted", None)  # only target-side methods have it
adapted = Path(adapted) if adapted else None
profile(snakemake.config, Path(i.weights), Path(i.arch), Path(snakemake.output.record),
        job_from_snakemake(snakemake), adapted=adapted)
