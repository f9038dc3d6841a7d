rule update_weights:
    input:
        unpack(update_inputs),
    output:
        index=f"{R}/updates/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.parquet",
        # runtime.keep_updates false: the ΔW files go once the jobs that read them are done (the index stays)
        **({} if KEEP_UPDATES else {"files": temp(directory(f"{R}/updates/{{model}}/{{dataset}}/{{run}}/shard{{shard}}"))}),
    params:
        spec=spec("update"),
        source=update_source,
        optional=optional_args,
        cache=f"{R}/cache/nullspace",
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
    log:
        f"{R}/logs/update_weights/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/update_weights/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.tsv"
    resources:
        **resources_of("update_weights"),
    threads: resource("update_weights", "cpus_per_task")
    shell:
        "{params.muke} update-weights --spec {params.spec:q} --model {input.model} {params.source}"
        " {params.optional} --cache-dir {params.cache} --out {output.index}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
