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
