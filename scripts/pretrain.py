"""Rule pretrain: the backbone on the source classes."""

from pathlib import Path

from pruneshot.stages import job_from_snakemake, pretrain

out = snakemake.output
pretrain(snakemake.config, int(snakemake.wildcards.replicate), Path(snakemake.input.manifest),
         Path(out.weights), Path(out.arch), Path(out.metrics), job_from_snakemake(snakemake))
