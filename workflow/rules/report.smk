# Not hashed: the report gathers the runs of the current config (labels say which run is which).
# Its spec names every file it reads, and is too long for a command line on a large config: the rule
# writes it to spec.json beside the page and hands the stage that file.
from muke.io import write_text

localrules: report


rule report:
    input:
        **PLAN.report_inputs(),
    output:
        metrics=f"{R}/tables/edit_metrics.parquet",
        metrics_csv=report(f"{R}/tables/edit_metrics.csv", caption="../report/edit_metrics.rst", category="Tables"),
        locality=f"{R}/tables/locality.parquet",
        locality_csv=report(f"{R}/tables/locality.csv", caption="../report/locality.rst", category="Tables"),
        html=report(f"{R}/report/index.html", caption="../report/index_html.rst", category="Report"),
        spec=f"{R}/report/spec.json",
    params:
        spec=PLAN.report_spec(),
        muke=run_setting(MUKE),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    resources:
        **resources_of("report"),
    run:
        # with muke estimate's peak memory of each job, which reads the prepared models' widths: added
        # now that they are prepared, outside params.spec (a rerun trigger)
        write_text(output.spec, PLAN.report_spec(estimates=True))
        shell("{params.muke} report --spec @{output.spec:q} --metrics {output.metrics} --locality {output.locality}"
              " --html {output.html} > {log} 2>&1")
