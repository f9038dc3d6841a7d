# Not hashed: the tables gather the runs of the current config (labels say which run is which).
localrules: report


rule report:
    input:
        **PLAN.report_inputs(),
    output:
        metrics=f"{R}/tables/edit_metrics.parquet",
        metrics_csv=f"{R}/tables/edit_metrics.csv",
        locality=f"{R}/tables/locality.parquet",
        locality_csv=f"{R}/tables/locality.csv",
        html=f"{R}/report/index.html",
    params:
        spec=PLAN.report_spec(),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    resources:
        **resources_of("report"),
    shell:
        "{MUKE} report --spec {params.spec:q} --summaries {input.summaries} --localities {input.localities}"
        " --metrics {output.metrics} --locality {output.locality} --html {output.html} > {log} 2>&1"
