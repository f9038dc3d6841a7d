rule score:
    input:
        generations=score_inputs,
        model=lambda wildcards: PLAN.model_dir(run_of("score", wildcards).model),   # its tokenizer
    output:
        samples=f"{R}/score/{{model}}/{{dataset}}/{{run}}/samples.parquet",
        summary=f"{R}/score/{{model}}/{{dataset}}/{{run}}/summary.parquet",
    params:
        spec=spec("score"),
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
    log:
        f"{R}/logs/score/{{model}}/{{dataset}}/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/score/{{model}}/{{dataset}}/{{run}}.tsv"
    resources:
        **resources_of("score"),
    threads: resource("score", "cpus_per_task")
    shell:
        "{params.muke} score --spec {params.spec:q} --generations {input.generations} --model {input.model}"
        " --samples {output.samples} --summary {output.summary} --device {params.device} --threads {threads}"
        " > {log} 2>&1"
