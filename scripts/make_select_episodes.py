"""Rule make_select_episodes: the fixed validation episodes of one shots value."""

from pathlib import Path

from pruneshot.config import select_ways
from pruneshot.stages.data import make_episodes
from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.select import SELECT_AXIS

cfg = snakemake.config
make_episodes(cfg, SELECT_AXIS, select_ways(cfg), int(snakemake.wildcards.shots), Path(snakemake.input.manifest),
              Path(snakemake.output.episodes), job_from_snakemake(snakemake),
              count=int(cfg["transfer"]["select"]["episodes"]))
