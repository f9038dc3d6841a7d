# Causal tracing of a model on a dataset (with trace.enabled): effects, heat maps and a layer band for the report.
TRACE_BATCH = config["trace"]["batch_size"]     # a run_setting(): never a rerun trigger


rule trace_layers:
    input:
        model=lambda wildcards: PLAN.model_dir(PLAN.models[wildcards.model]),
        requests=lambda wildcards: PLAN.datasets[wildcards.dataset].path,
    output:
        directory(f"{R}/trace/{{model}}/{{dataset}}/trace-{{trace_id}}"),
    params:
        spec=lambda wildcards: PLAN.layer_traces[(wildcards.model, wildcards.dataset)].to_json(),
        muke=run_setting(MUKE),
        device=run_setting(DEVICE),
        batch_size=run_setting(TRACE_BATCH),
    log:
        f"{R}/logs/trace_layers/{{model}}/{{dataset}}/trace-{{trace_id}}.log",
    benchmark:
        f"{R}/benchmarks/trace_layers/{{model}}/{{dataset}}/trace-{{trace_id}}.tsv"
    resources:
        **resources_of("trace_layers"),
    threads: resource("trace_layers", "cpus_per_task")
    shell:
        "{params.muke} trace-layers --spec {params.spec:q} --model {input.model} --requests {input.requests:q}"
        " --out {output} --batch-size {params.batch_size} --device {params.device} --threads {threads} > {log} 2>&1"
