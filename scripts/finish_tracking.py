"""Rule finish_tracking: end the study's MLflow parent run with its summary, report and status."""

from pathlib import Path

from pruneshot.stages.job import job_from_snakemake
from pruneshot.stages.tracking import finish_tracking

i = snakemake.input
job = job_from_snakemake(snakemake)
record = finish_tracking(snakemake.config, Path(i.study), Path(i.results), Path(i.sanity),
                         [Path(i.report), Path(i.results)], Path(snakemake.output.finished))
job.log(f"parent run {record['parent_run_id']}: {record['status']} "
        f"({'; '.join(record['reasons']) or 'every row ok, every gate passed'}); logged: {record['logged']}"
        + (f" ({record['error']})" if not record["logged"] else ""))
