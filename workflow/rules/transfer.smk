# One transfer job per (network, target, shots) runs every arm of the method on the same episodes.
rule transfer:
    input:
        unpack(lambda w: network_paths(dict(w.items()))),
        unpack(selection_inputs),
        study=R("study_json"),
        source_manifest=R("source_manifest"),
        target_manifest=R("target_manifest"),
        pool=R("target_pool"),
        episodes=R("episodes", ways=WAYS),
    output:
        record=R("transfer"),
    log:
        LOG("transfer"),
    benchmark:
        BENCH("transfer")
    params:
        arms=lambda w: method_arms(w.method),
        settings=transfer_settings,
    threads: 1
    resources:
        gpu=gpu_request(config["transfer"]["device"]),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/transfer.py"
