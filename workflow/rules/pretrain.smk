rule pretrain:
    input:
        study="results/mlflow/study.json",
        manifest="results/data/source/manifest.json",
        train="results/data/source/train.safetensors",
        val="results/data/source/val.safetensors",
    output:
        weights="results/pretrain/r{replicate}/model.safetensors",
        arch="results/pretrain/r{replicate}/arch.json",
        metrics="results/pretrain/r{replicate}/metrics.json",
    params:
        settings=PRETRAIN_SETTINGS,
    log:
        "logs/pretrain/r{replicate}.log",
    benchmark:
        "logs/benchmarks/pretrain/r{replicate}.tsv"
    threads: config["pretrain"]["threads"]
    resources:
        gpu=1 if config["pretrain"]["device"] == "cuda" else 0,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/pretrain.py"
