# transfer.select: transfer settings chosen on validation classes that are never target classes.
# Only when transfer.select is set (common.smk: SELECT); the transfer rule then reads the choice.


rule prepare_select:
    output:
        manifest=R("select_manifest"),
        pool=R("select_pool"),
    log:
        LOG("prepare_select"),
    params:
        settings=select_data_settings,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/prepare_select.py"


rule make_select_episodes:
    input:
        manifest=R("select_manifest"),
        pool=R("select_pool"),
    output:
        episodes=R("select_episodes"),
    log:
        LOG("make_select_episodes"),
    params:
        settings=select_episode_settings,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/make_select_episodes.py"


# One job per (network, shots): every trained arm of the method, every (lr, steps) of the grid.
rule select_transfer:
    input:
        unpack(lambda w: network_paths(dict(w.items()))),
        source_manifest=R("source_manifest"),
        select_manifest=R("select_manifest"),
        pool=R("select_pool"),
        episodes=R("select_episodes"),
    output:
        record=R("selection"),
    log:
        LOG("select_transfer"),
    benchmark:
        BENCH("select_transfer")
    params:
        arms=lambda w: method_arms(w.method),
        settings=select_settings,
    threads: 1
    resources:
        gpu=gpu_request(config["transfer"]["device"]),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/select_transfer.py"


rule selection_table:
    input:
        records=selection_outputs(),
    output:
        table=report(
            R("selection_csv"),
            caption="../report/selection.rst",
            category="Tables",
        ),
    log:
        LOG("selection_table"),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/selection_table.py"
