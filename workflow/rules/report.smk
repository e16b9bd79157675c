rule aggregate:
    input:
        cells=aggregate_inputs(),
        source_manifest="results/data/source/manifest.json",
        target_manifests=expand("results/data/target/{target}/manifest.json", target=TARGETS),
    output:
        results=report(
            "results/tables/results.csv",
            caption="../report/results.rst",
            category="Tables",
        ),
        episodes=report(
            "results/tables/episodes.csv",
            caption="../report/episodes.rst",
            category="Tables",
        ),
        metrics=report(
            "results/metrics.json",
            caption="../report/metrics.rst",
            category="Tables",
        ),
    params:
        cells=aggregate_cells(),
        targets=TARGETS,
        settings=CONFIG_SHA256,
    log:
        "logs/aggregate.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/aggregate.py"


rule report:
    input:
        results="results/tables/results.csv",
        episodes="results/tables/episodes.csv",
        study="results/mlflow/study.json",
        sync="results/mlflow/sync.json",
        source_manifest="results/data/source/manifest.json",
        target_manifests=expand("results/data/target/{target}/manifest.json", target=TARGETS),
    output:
        html=report(
            "results/report/index.html",
            caption="../report/index.rst",
            category="Report",
        ),
        figures=report(
            directory("results/report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
            labels={"figure": "{name}"},
        ),
    params:
        targets=TARGETS,
        settings=CONFIG_SHA256,
    log:
        "logs/report.log",
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/report.py"
