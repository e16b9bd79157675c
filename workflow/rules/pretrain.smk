rule pretrain:
    input:
        study=R("study_json"),
        manifest=R("source_manifest"),
        train=R("source_train"),
        val=R("source_val"),
    output:
        weights=R("pretrain_weights"),
        arch=R("pretrain_arch"),
        metrics=R("pretrain_metrics"),
    log:
        LOG("pretrain"),
    benchmark:
        BENCH("pretrain")
    params:
        settings=PRETRAIN_SETTINGS,
    threads: config["pretrain"]["threads"]
    resources:
        gpu=gpu_request(config["pretrain"]["device"]),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/pretrain.py"
