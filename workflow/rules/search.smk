# Source-side methods only: a target-side method prunes per episode, inside transfer.
rule search:
    input:
        study=R("study_json"),
        manifest=R("source_manifest"),
        train=R("source_train"),
        val=R("source_val"),
        weights=R("pretrain_weights"),
        arch=R("pretrain_arch"),
        metrics=R("pretrain_metrics"),
    output:
        weights=R("search_weights"),
        arch=R("search_arch"),
        record=R("search_record"),
    wildcard_constraints:
        method=_alts(SOURCE_SIDE),
    log:
        LOG("search"),
    benchmark:
        BENCH("search")
    params:
        settings=search_settings,
    threads: search_threads
    resources:
        gpu=search_gpu,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/search.py"
