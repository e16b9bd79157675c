rule prepare_source:
    output:
        manifest=R("source_manifest"),
        train=R("source_train"),
        val=R("source_val"),
    log:
        LOG("prepare_source"),
    params:
        settings=SOURCE_SETTINGS,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/prepare_source.py"


rule prepare_target:
    output:
        manifest=R("target_manifest"),
        pool=R("target_pool"),
    log:
        LOG("prepare_target"),
    params:
        settings=target_settings,
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
    log:
        LOG("make_episodes"),
    params:
        settings=episode_settings,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/make_episodes.py"
