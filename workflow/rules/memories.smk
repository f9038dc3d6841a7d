rule optimize_memories:
    input:
        unpack(memories_inputs),
    output:
        memories=f"{R}/memories/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.safetensors",
        trace=f"{R}/memories/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.trace.parquet",
    params:
        spec=spec("memories"),
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
    log:
        f"{R}/logs/optimize_memories/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/optimize_memories/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.tsv"
    resources:
        **resources_of("optimize_memories"),
    threads: resource("optimize_memories", "cpus_per_task")
    # the longest stage on every path to the report: start it before anything that can wait
    priority: 10
    shell:
        "{params.muke} optimize-memories --spec {params.spec:q} --model {input.model} --requests {input.requests:q}"
        " --shard {wildcards.shard} --out {output.memories} --trace {output.trace}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
