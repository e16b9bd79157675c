# Latency is measured with the whole machine reserved (threads = all cores), so no other
# job disturbs the timings; the timed forward passes themselves use profile.threads.
rule profile:
    input:
        weights=R("search_weights"),
        arch=R("search_arch"),
    output:
        record=R("profile"),
    wildcard_constraints:
        method=_alts(SOURCE_SIDE),
    log:
        LOG("profile"),
    benchmark:
        BENCH("profile")
    params:
        settings=PROFILE_SETTINGS,
    threads: all_cores()
    resources:
        gpu=gpu_request(PROFILE_DEVICE),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/profile.py"


# A target-side method prunes per episode: each transfer cell times its own median-size network.
rule profile_adapted:
    input:
        weights=R("pretrain_weights"),
        arch=R("pretrain_arch"),
        adapted=R("transfer"),
    output:
        record=R("profile_adapted"),
    wildcard_constraints:
        method=_alts(TARGET_SIDE),
    log:
        LOG("profile_adapted"),
    benchmark:
        BENCH("profile_adapted")
    params:
        settings=PROFILE_SETTINGS,
    threads: all_cores()
    resources:
        gpu=gpu_request(PROFILE_DEVICE),
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/profile.py"
