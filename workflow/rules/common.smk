# Look-ups into the plan (muke/workflow/identity.py): paths, specs (the parameter identities) and resources of
# every job. Rules stay thin: they name their files and call `{params.muke} <stage>`.

import shlex
import sys

R = PLAN.results
MUKE = config["muke_cmd"]                       # "python -m muke stage" or "muke stage"
if MUKE.split()[0] == "python":                 # the interpreter running Snakemake, which has muke
    MUKE = shlex.quote(sys.executable) + MUKE[len("python"):]
DEVICE = config["runtime"]["device"]            # passed as run_setting(): never a rerun trigger
CHECKPOINT_EVERY = config["runtime"]["stats_checkpoint_every"]
STATS_STORE = config["runtime"]["stats_store"]  # statistics shared across experiments (collect_stats.py)
STORE_ARG = f"--store {shlex.quote(STATS_STORE)}" if STATS_STORE else ""
KEEP_UPDATES = config["runtime"]["keep_updates"]  # false: ΔW files are temp(), gone once answered and scored


wildcard_constraints:
    model=r"[^/]+",
    model_id=r"[^/]+",
    dataset=r"[^/]+",
    run=r"[^/]+",
    stats_id=r"[^/]+",
    shard=r"\d+",
    trace_id=r"[^/]+",


def run_setting(value):
    """params: a setting of how a job runs (the muke command, the device, a batch size), not of what it
    computes. The function takes `input`, which makes it a derived param that Snakemake leaves out of the
    `params` rerun trigger: moving the checkout or switching device reruns nothing (the output paths carry
    the identity of what each job computes)."""
    return lambda wildcards, input: value


def run_of(stage, wildcards):
    return PLAN.run(stage, wildcards.model, wildcards.dataset, wildcards.run)


def spec(stage):
    """params: the job's spec (its identity is in the output path)."""
    def get(wildcards):
        return getattr(run_of(stage, wildcards), stage).to_json()
    return get


def resource(stage, key):
    """resources: from the model preset (`resources.default`, then `resources.<stage>`); None (unset,
    so the executor passes nothing) for an optional key the job's model does not set."""
    def get(wildcards):
        model = PLAN.model_of(stage, wildcards) if stage != "report" else None
        return PLAN.resources(stage, model).get(key)
    return get


def resources_of(stage):
    keys = ("gpu", "mem_mb", "runtime", "cpus_per_task", "constraint", "slurm_extra")
    return {key: resource(stage, key) for key in keys}


def optional_args(wildcards, input):
    """--stats / --preservation for the inputs a job has (a derived param: never a rerun trigger)."""
    return " ".join(f"--{name} {shlex.quote(str(input[name]))}" for name in ("stats", "preservation")
                    if name in input.keys())


def model_input(wildcards):
    return PLAN.model_dir(PLAN.models[wildcards.model])


def stats_inputs(wildcards):
    model, spec_ = PLAN.stats(wildcards.model, wildcards.stats_id)
    files = {"model": PLAN.model_dir(model)}
    corpus = PLAN.stats_corpus(spec_)
    if not corpus.startswith("hf:"):
        files["corpus"] = corpus
    return files


def memories_inputs(wildcards):
    run = run_of("memories", wildcards)
    return {"model": PLAN.model_dir(run.model), "requests": run.dataset.path}


def update_inputs(wildcards):
    run = run_of("update", wildcards)
    files = {"model": PLAN.model_dir(run.model)}
    if run.memories is not None:
        files["memories"] = PLAN.memories_path(run, int(wildcards.shard))
    else:  # a backend without target memories (ft, lora) reads the requests
        files["requests"] = run.dataset.path
    if run.stats is not None:
        files["stats"] = PLAN.stats_path(run.model, run.stats)
    if run.update.params["backend"] == "unke":
        files["preservation"] = PLAN.preservation_path(run)
    return files


def update_source(wildcards, input):
    """--memories, or --requests and --shard for a backend without target memories (a derived param: never
    a rerun trigger)."""
    if "memories" in input.keys():
        return f"--memories {shlex.quote(str(input.memories))}"
    return f"--requests {shlex.quote(str(input.requests))} --shard {wildcards.shard}"


def sequence_inputs(wildcards):
    run = run_of("sequence", wildcards)
    files = {"model": PLAN.model_dir(run.model), "requests": run.dataset.path}
    if run.stats is not None:
        files["stats"] = PLAN.stats_path(run.model, run.stats)
    if run.sequence.params["backend"] == "unke":
        files["preservation"] = PLAN.preservation_path(run)
    return files


def chain_arg(wildcards, input):
    """--chain for a job of a sequential run (a derived param: never a rerun trigger)."""
    return f"--chain {shlex.quote(str(input.chain))}" if "chain" in input.keys() else ""


def generate_inputs(wildcards):
    run = run_of("generate", wildcards)
    files = {"model": PLAN.model_dir(run.model), "requests": run.dataset.path}
    if run.update is not None:
        files["weights"] = PLAN.update_path(run, int(wildcards.shard))
        if not KEEP_UPDATES:
            files["weight_files"] = update_files(files["weights"])
    if run.sequence is not None:
        files["chain"] = PLAN.sequence_path(run)
    return files


def update_files(index):
    """The folder of ΔW files beside an update index (an output of update_weights, temp() without keep_updates)."""
    return index.removesuffix(".parquet")


def score_inputs(wildcards):
    run = run_of("score", wildcards)
    return [PLAN.generate_path(run, shard) for shard in PLAN.shards(run)]


def locality_job(wildcards):
    """(model, spec, update indexes) of a locality job; dataset "-" holds the unedited model's."""
    if wildcards.dataset == "-":
        model = PLAN.models[wildcards.model]
        return model, PLAN.pre_edit_locality[model.name], []
    run = run_of("locality", wildcards)
    if run.sequence is not None:
        return run.model, run.locality, []
    return run.model, run.locality, [PLAN.update_path(run, shard) for shard in PLAN.shards(run)]


def locality_inputs(wildcards):
    model, _, updates = locality_job(wildcards)
    files = {"model": PLAN.model_dir(model), "updates": updates}
    if not KEEP_UPDATES:
        files["update_files"] = [update_files(u) for u in updates]
    if wildcards.dataset != "-" and run_of("locality", wildcards).sequence is not None:
        files["chain"] = PLAN.sequence_path(run_of("locality", wildcards))
    return files
