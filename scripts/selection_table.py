"""Rule selection_table: every network's validation grid and choice as one CSV."""

from pathlib import Path

from pruneshot.stages.select import selection_table

selection_table([Path(p) for p in snakemake.input.records], Path(snakemake.output.table))
