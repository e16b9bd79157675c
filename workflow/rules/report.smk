rule aggregate:
    input:
        cells=aggregate_inputs(),
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
        results=R("results_csv"),
        episodes=R("episodes_csv"),
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
