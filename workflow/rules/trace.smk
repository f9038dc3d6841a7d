# Causal tracing of a model on a dataset (with trace.enabled): effects, heat maps and a layer band for the report.
TRACE_BATCH = config["trace"]["batch_size"]     # formatted into the command: never a rerun trigger


rule trace_layers:
    input:
        model=lambda wildcards: PLAN.model_dir(PLAN.models[wildcards.model]),
        requests=lambda wildcards: PLAN.datasets[wildcards.dataset].path,
    output:
        directory(f"{R}/trace/{{model}}/{{dataset}}/trace-{{trace_id}}"),
    params:
        spec=lambda wildcards: PLAN.layer_traces[(wildcards.model, wildcards.dataset)].to_json(),
    log:
        f"{R}/logs/trace_layers/{{model}}/{{dataset}}/trace-{{trace_id}}.log",
    benchmark:
        f"{R}/benchmarks/trace_layers/{{model}}/{{dataset}}/trace-{{trace_id}}.tsv"
    resources:
        **resources_of("trace_layers"),
    threads: resource("trace_layers", "cpus_per_task")
    shell:
        "{MUKE} trace-layers --spec {params.spec:q} --model {input.model} --requests {input.requests:q}"
        " --out {output} --batch-size {TRACE_BATCH} --device {DEVICE} --threads {threads} > {log} 2>&1"
