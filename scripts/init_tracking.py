"""Rule init_tracking: create the MLflow store and the study's parent run before the fan-out."""

from pathlib import Path

from pruneshot.stages.tracking import init_tracking

init_tracking(snakemake.config, Path(snakemake.output.study))
