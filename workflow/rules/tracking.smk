rule init_tracking:
    output:
        study="results/mlflow/study.json",
    log:
        "logs/init_tracking.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/init_tracking.py"


rule sync_tracking:
    input:
        study="results/mlflow/study.json",
        records=transfer_outputs(),
        profiles=[PROFILE.format(method=m, budget=b, replicate=r) for m, b, r in networks()],
    output:
        sync="results/mlflow/sync.json",
    log:
        "logs/sync_tracking.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/sync_tracking.py"
