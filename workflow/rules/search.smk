rule search:
    input:
        study="results/mlflow/study.json",
        manifest="results/data/source/manifest.json",
        train="results/data/source/train.safetensors",
        val="results/data/source/val.safetensors",
        weights="results/pretrain/r{replicate}/model.safetensors",
        arch="results/pretrain/r{replicate}/arch.json",
        metrics="results/pretrain/r{replicate}/metrics.json",
    output:
        weights="results/search/{method}/b{budget}/r{replicate}/model.safetensors",
        arch="results/search/{method}/b{budget}/r{replicate}/arch.json",
        record="results/search/{method}/b{budget}/r{replicate}/record.json",
    params:
        settings=search_settings,
    log:
        "logs/search/{method}/b{budget}/r{replicate}.log",
    benchmark:
        "logs/benchmarks/search/{method}/b{budget}/r{replicate}.tsv"
    threads: 1
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/search.py"
