# editing.mode sequential: the requests edited batch after batch into one model; the chain of ΔW files
# lies in chain/ beside the index. Its jobs get the optimize_memories resources (the δ loop dominates).
rule edit_sequence:
    input:
        unpack(sequence_inputs),
    output:
        f"{R}/sequences/{{model}}/{{dataset}}/{{run}}/chain.parquet",
    params:
        spec=spec("sequence"),
        optional=optional_args,
        cache=f"{R}/cache/nullspace",
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
    log:
        f"{R}/logs/edit_sequence/{{model}}/{{dataset}}/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/edit_sequence/{{model}}/{{dataset}}/{{run}}.tsv"
    resources:
        **resources_of("optimize_memories"),
    threads: resource("optimize_memories", "cpus_per_task")
    priority: 10
    shell:
        "{params.muke} edit-sequence --spec {params.spec:q} --model {input.model} --requests {input.requests:q}"
        " {params.optional} --cache-dir {params.cache} --out {output}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
