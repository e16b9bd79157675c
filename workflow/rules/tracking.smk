rule init_tracking:
    output:
        study=R("study_json"),
    log:
        LOG("init_tracking"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/init_tracking.py"


rule sync_tracking:
    input:
        study=R("study_json"),
        records=transfer_outputs(),
        profiles=profile_outputs(),
        budget_one=expand(R("budget_one"), replicate=REPLICATES),
    output:
        sync=R("sync_json"),
    log:
        LOG("sync_tracking"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/sync_tracking.py"


# Ends the study's parent run (opened RUNNING by init_tracking): summary metrics, the report and the
# results table as artifacts, and a status that reflects the study.
rule finish_tracking:
    input:
        study=R("study_json"),
        results=R("results_csv"),
        sanity=R("sanity_json"),
        report=R("report_html"),
    output:
        finished=R("finish_json"),
    log:
        LOG("finish_tracking"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/finish_tracking.py"
