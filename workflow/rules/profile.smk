# Latency is measured with the whole machine reserved (threads = all cores), so no other
# job disturbs the timings; the timed forward passes themselves use profile.threads.
# A target-side method prunes per episode: its timed network comes from a transfer record.
rule profile:
    input:
        unpack(profile_inputs),
    output:
        record=PROFILE,
    params:
        settings=PROFILE_SETTINGS,
    log:
        "logs/profile/{method}/b{budget}/r{replicate}.log",
    benchmark:
        "logs/benchmarks/profile/{method}/b{budget}/r{replicate}.tsv"
    threads: all_cores()
    conda:
        "../../envs/pruneshot.yaml"
    script:
        "../../scripts/profile.py"
