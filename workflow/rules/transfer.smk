rule transfer:
    input:
        study="results/mlflow/study.json",
        weights="results/search/{method}/b{budget}/r{replicate}/model.safetensors",
        arch="results/search/{method}/b{budget}/r{replicate}/arch.json",
        record="results/search/{method}/b{budget}/r{replicate}/record.json",
        source_manifest="results/data/source/manifest.json",
        target_manifest="results/data/target/{target}/manifest.json",
        pool="results/data/target/{target}/pool.safetensors",
        episodes=f"results/episodes/{{target}}/{WAYS}way_{{shots}}shot.json",
    output:
        record=TRANSFER,
    log:
        "logs/transfer/{target}/{method}/b{budget}/{shots}shot/r{replicate}.log",
    benchmark:
        "logs/benchmarks/transfer/{target}/{method}/b{budget}/{shots}shot/r{replicate}.tsv"
    params:
        arms=lambda w: method_arms(w.method),
        settings=transfer_settings,
    threads: 1
    resources:
        gpu=1 if config["transfer"]["device"] == "cuda" else 0,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/transfer.py"
