# Dataset "-": the unedited model's locality (one job per model, shared by every dataset and method).
rule locality:
    input:
        unpack(locality_inputs),
    output:
        f"{R}/locality/{{model}}/{{dataset}}/{{run}}/locality.parquet",
    params:
        spec=lambda wildcards: locality_job(wildcards)[1].to_json(),
        chain=chain_arg,
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
    log:
        f"{R}/logs/locality/{{model}}/{{dataset}}/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/locality/{{model}}/{{dataset}}/{{run}}.tsv"
    resources:
        **resources_of("locality"),
    threads: resource("locality", "cpus_per_task")
    shell:
        "{params.muke} locality --spec {params.spec:q} --model {input.model} --updates {input.updates} {params.chain}"
        " --out {output} --device {params.device} --threads {threads} > {log} 2>&1"
