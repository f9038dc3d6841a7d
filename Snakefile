# muke workflow: edit long-form knowledge into causal LMs and evaluate it (see README.md).
#
#   snakemake --profile workflow/profiles/default                      # the demo (config/config.yaml)
#   snakemake --profile workflow/profiles/default --configfile config/tiny.yaml
#   snakemake --profile workflow/profiles/slurm --configfile config/experiments/table1-qwen2.5-7b.yaml
#
# A --configfile replaces config/config.yaml (it is not merged into it). Every output path carries the
# identity of its stage's parameters, inputs and code (muke/workflow/plan.py, muke/workflow/identity.py):
# change a value and only what it reaches reruns; set it back and the earlier results are found again.
#
# No rule names a conda env or container (`snakemake --lint` asks for one): every rule runs the one `muke`
# package, from the environment that runs Snakemake (muke_cmd). Its software is pyproject.toml's pins, with
# torch's CUDA build chosen for the cluster; a per-rule env would duplicate those pins and drift from them.

from pathlib import Path

from snakemake.utils import min_version, validate

from muke.workflow.config import check_config
from muke.workflow.identity import freeze_code_identities
from muke.workflow.plan import Plan

min_version("9.0")

if not workflow.config_settings.configfiles:
    configfile: "config/config.yaml"

check_config(config, Path(workflow.basedir) / "config" / "schema.yaml")   # readable errors naming the key
validate(config, "config/schema.yaml")                              # Snakemake's own check (+ defaults)

freeze_code_identities()     # the same output paths in the child processes of `run:` jobs
PLAN = Plan(config, basedir=workflow.basedir)

report: "workflow/report/workflow.rst"      # `snakemake --report report.zip`: this text, the page and the tables


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/memories.smk"
include: "workflow/rules/update.smk"
include: "workflow/rules/sequence.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/locality.smk"
include: "workflow/rules/trace.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,
    default_target: True
