"""Rule transfer: fine-tune and score one pruned network on every saved episode, under every arm."""

from pathlib import Path

from pruneshot.stages import job_from_snakemake, transfer

w, i = snakemake.wildcards, snakemake.input
transfer(snakemake.config, w.method, list(snakemake.params.arms), int(w.shots), w.target, int(w.replicate),
         Path(i.weights), Path(i.arch), Path(i.record), Path(i.source_manifest), Path(i.target_manifest),
         Path(i.episodes), Path(snakemake.output.record), job_from_snakemake(snakemake))
