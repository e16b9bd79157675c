rule aggregate:
    input:
        cells=aggregate_inputs(),
        sync=R("sync_json"),
        source_manifest=R("source_manifest"),
        target_manifests=[R("target_manifest", target=t) for t in TARGETS],
    output:
        results=report(
            R("results_csv"),
            caption="../report/results.rst",
            category="Tables",
        ),
        episodes=report(
            R("episodes_csv"),
            caption="../report/episodes.rst",
            category="Tables",
        ),
        metrics=report(
            R("metrics_json"),
            caption="../report/metrics.rst",
            category="Tables",
        ),
    log:
        LOG("aggregate"),
    params:
        cells=aggregate_cells(),
        targets=TARGETS,
        settings=CONFIG_SHA256,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/aggregate.py"


rule report:
    input:
        unpack(lambda w: {"selection": R("selection_csv")} if SELECT else {}),
        results=R("results_csv"),
        episodes=R("episodes_csv"),
        sanity=R("sanity_json"),
        study=R("study_json"),
        sync=R("sync_json"),
        source_manifest=R("source_manifest"),
        target_manifests=[R("target_manifest", target=t) for t in TARGETS],
    output:
        html=report(
            R("report_html"),
            caption="../report/index.rst",
            category="Report",
        ),
        figures=report(
            directory(R("report_figures")),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
            labels={"figure": "{name}"},
        ),
    log:
        LOG("report"),
    params:
        targets=TARGETS,
        settings=CONFIG_SHA256,
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/report.py"


# Gate (c): every method at budget 1.0 must return the dense network (pruneshot.report.sanity).
rule budget_one:
    input:
        study=R("study_json"),
        manifest=R("source_manifest"),
        train=R("source_train"),
        val=R("source_val"),
        weights=R("pretrain_weights"),
        arch=R("pretrain_arch"),
        metrics=R("pretrain_metrics"),
        target_manifest=R("target_manifest", target=TARGETS[0]),
        pool=R("target_pool", target=TARGETS[0]),
        episodes=R("episodes", target=TARGETS[0], ways=WAYS, shots=SHOTS[0]),
    output:
        record=R("budget_one"),
    log:
        LOG("budget_one"),
    params:
        settings=lambda w: settings_hash(PRETRAIN_SETTINGS, config["methods"], config["budget"]["metric"],
                                         [options_for(config, m) for m in METHODS.values()], config["episodes"]),
    threads: 1
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/budget_one.py"


# The three sanity gates, shown at the top of the report and at the end of `make run`.
rule sanity:
    input:
        transfers=sanity_transfers(),
        budget_one=expand(R("budget_one"), replicate=REPLICATES),
    output:
        gates=R("sanity_json"),
    log:
        LOG("sanity"),
    params:
        settings=CONFIG_SHA256,
    threads: 1
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/sanity.py"
