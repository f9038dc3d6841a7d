rule generate:
    input:
        unpack(generate_inputs),
    output:
        f"{R}/generate/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.parquet",
    params:
        spec=spec("generate"),
        weights=lambda wildcards, input: f"--update {input.weights}" if "weights" in input.keys() else "",
        chain=chain_arg,
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
    log:
        f"{R}/logs/generate/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/generate/{{model}}/{{dataset}}/{{run}}/shard{{shard}}.tsv"
    resources:
        **resources_of("generate"),
    threads: resource("generate", "cpus_per_task")
    shell:
        "{params.muke} generate --spec {params.spec:q} --model {input.model} --requests {input.requests:q}"
        " --shard {wildcards.shard} {params.weights} {params.chain} --out {output}"
        " --device {params.device} --threads {threads} > {log} 2>&1"
