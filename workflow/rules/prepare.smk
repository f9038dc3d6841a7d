rule prepare_model:
    output:
        directory(f"{R}/models/{{model_id}}"),
    params:
        spec=lambda wildcards: PLAN.model_by_id(wildcards.model_id).spec.to_json(),
        muke=run_setting(MUKE),
    log:
        f"{R}/logs/prepare_model/{{model_id}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_model/{{model_id}}.tsv"
    resources:
        **resources_of("prepare_model"),
    threads: resource("prepare_model", "cpus_per_task")
    shell:
        "{params.muke} prepare-model --spec {params.spec:q} --out {output} > {log} 2>&1"
