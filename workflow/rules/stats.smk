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
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
        checkpoint_every=run_setting(CHECKPOINT_EVERY),
        store=run_setting(STORE_ARG),
    log:
        f"{R}/logs/collect_stats/{{model}}/{{stats_id}}.log",
    benchmark:
        f"{R}/benchmarks/collect_stats/{{model}}/{{stats_id}}.tsv"
    resources:
        **resources_of("collect_stats"),
    threads: resource("collect_stats", "cpus_per_task")
    shell:
        "{params.muke} collect-stats --spec {params.spec:q} --model {input.model} --corpus {params.corpus:q}"
        " --out {output} --checkpoint-every {params.checkpoint_every} {params.store} --device {params.device} --threads {threads}"
        " > {log} 2>&1"
