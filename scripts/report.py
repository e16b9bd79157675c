"""Rule report: the self-contained HTML report."""

from pathlib import Path

from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.report import report

i, o = snakemake.input, snakemake.output
targets = dict(zip(snakemake.params.targets, map(Path, i.target_manifests), strict=True))
report(snakemake.config, Path(i.results), Path(i.study), Path(i.sync), Path(i.source_manifest), targets,
       Path(o.html), Path(o.figures), job_from_snakemake(snakemake), episodes_csv=Path(i.episodes),
       sanity_json=Path(i.sanity), selection_csv=Path(i.selection) if hasattr(i, "selection") else None)
