rule prepare_source:
    output:
        manifest=R("source_manifest"),
        train=R("source_train"),
        val=R("source_val"),
    params:
        settings=SOURCE_SETTINGS,
    log:
        LOG("prepare_source"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/prepare_source.py"


rule prepare_target:
    output:
        manifest=R("target_manifest"),
        pool=R("target_pool"),
    params:
        settings=target_settings,
    log:
        LOG("prepare_target"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/prepare_target.py"


rule make_episodes:
    input:
        manifest=R("target_manifest"),
        pool=R("target_pool"),
    output:
        episodes=R("episodes"),
    params:
        settings=episode_settings,
    log:
        LOG("make_episodes"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/make_episodes.py"
