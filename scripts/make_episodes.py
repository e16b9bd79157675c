"""Rule make_episodes: the fixed episodes of one (target, ways, shots)."""

from pathlib import Path

from pruneshot.stages.data import make_episodes
from pruneshot.stages.job import job_from_snakemake

w = snakemake.wildcards
make_episodes(snakemake.config, w.target, int(w.ways), int(w.shots), Path(snakemake.input.manifest),
              Path(snakemake.output.episodes), job_from_snakemake(snakemake))
