"""Scheduler resources for a cluster: a preset or model entry may ask for node features (`constraint`,
SLURM -C) and further sbatch options (`slurm_extra`); jobs of a model that sets none get neither."""

import copy

from test_workflow import TINY, make_workdir, needs_snakemake, snakemake

from muke.workflow.plan import Plan


def config() -> dict:
    c = copy.deepcopy(TINY)
    c["methods"] = ["muke-memit"]
    c["models"] = {
        "tiny": {
            "preset": "tiny",
            "resources": {"generate": {"gpu": 1, "constraint": "a100|h100", "slurm_extra": "--qos=long"}},
        }
    }
    return c


def test_plan_resources_carry_constraint_and_slurm_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(make_workdir(tmp_path))
    plan = Plan(config())
    model = plan.models["tiny"]
    generate = plan.resources("generate", model)
    assert (generate["gpu"], generate["constraint"], generate["slurm_extra"]) == (1, "a100|h100", "--qos=long")
    assert "constraint" not in plan.resources("optimize_memories", model)


@needs_snakemake
def test_jobs_get_them_and_only_where_set(tmp_path):
    proc = snakemake(make_workdir(tmp_path), config(), "-n")
    jobs = (proc.stdout + proc.stderr).split("\nrule ")[1:]
    resources = {
        job.split(":", 1)[0]: job.split("resources:", 1)[1].splitlines()[0] for job in jobs if "resources:" in job
    }
    assert "constraint=a100|h100" in resources["generate"] and "slurm_extra=--qos=long" in resources["generate"]
    assert "constraint" not in resources["optimize_memories"] and "slurm_extra" not in resources["update_weights"]
