rule prepare_source:
    output:
        manifest="results/data/source/manifest.json",
        train="results/data/source/train.safetensors",
        val="results/data/source/val.safetensors",
    params:
        settings=SOURCE_SETTINGS,
    log:
        "logs/prepare_source.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/prepare_source.py"


rule prepare_target:
    output:
        manifest="results/data/target/{target}/manifest.json",
        pool="results/data/target/{target}/pool.safetensors",
    params:
        settings=target_settings,
    log:
        "logs/prepare_target/{target}.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/prepare_target.py"


rule make_episodes:
    input:
        manifest="results/data/target/{target}/manifest.json",
        pool="results/data/target/{target}/pool.safetensors",
    output:
        episodes="results/episodes/{target}/{ways}way_{shots}shot.json",
    params:
        settings=episode_settings,
    log:
        "logs/make_episodes/{target}/{ways}way_{shots}shot.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/make_episodes.py"
