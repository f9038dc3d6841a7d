rule collect_stats:
    input:
        unpack(stats_inputs),
    output:
        f"{R}/stats/{{model}}/{{stats_id}}.safetensors",
    params:
        spec=lambda wildcards: PLAN.stats(wildcards.model, wildcards.stats_id)[1].to_json(),
        # the local file (an input) or "hf:NAME"; derived from the input: never a rerun trigger
        corpus=lambda wildcards, input: input.get("corpus") or PLAN.stats_corpus(
            PLAN.stats(wildcards.model, wildcards.stats_id)[1]),
    log:
        f"{R}/logs/collect_stats/{{model}}/{{stats_id}}.log",
    benchmark:
        f"{R}/benchmarks/collect_stats/{{model}}/{{stats_id}}.tsv"
    resources:
        **resources_of("collect_stats"),
    threads: resource("collect_stats", "cpus_per_task")
    shell:
        "{MUKE} collect-stats --spec {params.spec:q} --model {input.model} --corpus {params.corpus:q}"
        " --out {output} --checkpoint-every {CHECKPOINT_EVERY} {STORE_ARG} --device {DEVICE} --threads {threads}"
        " > {log} 2>&1"
