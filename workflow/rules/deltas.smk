rule optimize_deltas:
    input:
        unpack(deltas_inputs),
    output:
        deltas=f"{R}/deltas/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.safetensors",
        trace=f"{R}/deltas/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.trace.parquet",
    params:
        spec=spec("deltas"),
    log:
        f"{R}/logs/optimize_deltas/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/optimize_deltas/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.tsv"
    resources:
        **resources_of("optimize_deltas"),
    threads: resource("optimize_deltas", "cpus_per_task")
    # the longest stage on every path to the report: start it before anything that can wait
    priority: 10
    shell:
        "{MUKE} optimize-deltas --spec {params.spec:q} --model {input.model} --requests {input.requests:q}"
        " --shard {wildcards.shard} --out {output.deltas} --trace {output.trace}"
        " --device {DEVICE} --threads {threads} > {log} 2>&1"
