"""General-ability locality (docs/ALGORITHM.md §6): MMLU and IFEval through lm-evaluation-harness on a model in memory.

Tasks are named as lm-eval names them: the hub tasks (`mmlu`, `ifeval`) on clusters, or tasks defined
under an include path such as the offline demo tasks in resources/lm_eval_tasks (`muke_mmlu_demo`,
`muke_ifeval_demo`). Nothing is written to disk; results come back as rows
{model_state, task, metric, value, stderr, n_samples}.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from muke.data import RESOURCES
from muke.engine.windows import uses_chat_template
from muke.gguf import WheelUnavailable, download_wheel
from muke.hub import missing_offline
from muke.io import cache_dir as muke_cache

DEMO_TASKS_DIR = RESOURCES / "lm_eval_tasks"

# NLTK's English punkt_tab (IFEval's sentence splitter) ships inside this MIT-licensed wheel.
PUNKT_WHEEL = "llama-index-core==0.14.25"
PUNKT_WHEEL_GLOB = "llama_index_core-0.14.25-*.whl"
PUNKT_MEMBER = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/"


def _use_nltk_data(root: Path) -> None:
    """Put `root` first on nltk's search path, in this process and in its children."""
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(root) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([str(root)] + [p for p in paths if p])


def _extract_punkt_tab(wheel: Path, nltk_root: Path) -> None:
    """Unpack the wheel's tokenizers/punkt_tab folder into nltk_root/tokenizers/punkt_tab (atomically)."""
    target = nltk_root / "tokenizers" / "punkt_tab"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(PUNKT_MEMBER) and not member.endswith("/"):
                dest = Path(tmp, "punkt_tab", member[len(PUNKT_MEMBER) :])
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        shutil.rmtree(target, ignore_errors=True)
        Path(tmp, "punkt_tab").rename(target)


def ensure_punkt_tab(cache_dir: str | Path | None = None) -> Path:
    """Make nltk find `tokenizers/punkt_tab` without nltk.download; return its folder.

    Looks in nltk's usual places and <cache>/nltk_data (cache: $MUKE_CACHE or ~/.cache/muke); if it is
    nowhere, extracts it from the llama-index-core wheel. Call before lm-eval's ifeval is imported.
    """
    import nltk

    cache = Path(cache_dir) if cache_dir is not None else muke_cache()
    nltk_root = cache / "nltk_data"
    _use_nltk_data(nltk_root)
    try:
        return Path(nltk.data.find("tokenizers/punkt_tab"))
    except LookupError:
        pass
    with missing_offline(
        f"NLTK's punkt_tab (IFEval's sentence splitter, from the wheel {PUNKT_WHEEL})", (WheelUnavailable,)
    ):
        wheel = download_wheel(PUNKT_WHEEL, PUNKT_WHEEL_GLOB, cache / "wheels")
    _extract_punkt_tab(wheel, nltk_root)
    return Path(nltk.data.find("tokenizers/punkt_tab"))


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """A TaskManager that knows `tasks`; the include path alone when it defines them all.

    Indexing lm-eval's own ~15k tasks takes ~12 s, so it is done only for tasks the include path lacks.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    missing = sorted(set(tasks) - set(manager.all_tasks))
    if missing:
        raise ValueError(f"unknown lm-eval tasks {missing} (include path: {include_path})")
    return manager


def _number(value) -> float | None:
    """lm-eval writes "N/A" where it has no stderr."""
    return float(value) if isinstance(value, (int, float)) else None


def result_rows(results: dict, model_state: str | None = None) -> list[dict]:
    """simple_evaluate's output → one row per (task, metric); a filter other than "none" stays as "metric,filter"."""
    rows = []
    for task, metrics in results["results"].items():
        n_samples = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr"):
                continue
            rows.append(
                dict(
                    model_state=model_state,
                    task=task,
                    metric=name if filt == "none" else key,
                    value=_number(value),
                    stderr=_number(metrics.get(f"{name}_stderr,{filt}")),
                    n_samples=n_samples,
                )
            )
    return rows


def evaluate(
    em,
    tasks: list[str],
    include_path: str | Path | None = DEMO_TASKS_DIR,
    limit: int | float | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    batch_size: int | str = 8,
    gen_kwargs: str | dict | None = None,
    model_state: str | None = None,
) -> list[dict]:
    """Evaluate the in-memory model `em.model` (edited or not) on lm-eval tasks; nothing is saved.

    Chat template on, few-shot examples as multi-turn chat (both off for a tokenizer without a template).
    num_fewshot: one value for all tasks or {task: shots} (None: the task's own default, 5 for muke_mmlu_demo;
    hub `mmlu` needs 5 given).
    gen_kwargs overrides generation settings of generative tasks (e.g. {"max_gen_toks": 64}).
    """
    if any("ifeval" in task for task in tasks):
        ensure_punkt_tab()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=em.model, tokenizer=em.tokenizer, batch_size=batch_size)
    manager = task_manager(tasks, include_path)
    # multi-turn chat few-shot, as the paper's protocol (docs/ALGORITHM.md §6)
    chat = uses_chat_template(em.tokenizer)
    options = dict(task_manager=manager, limit=limit, apply_chat_template=chat, fewshot_as_multiturn=chat)
    rows = []
    for task in tasks:  # one run per task: each may have its own number of shots
        shots = num_fewshot.get(task) if isinstance(num_fewshot, Mapping) else num_fewshot
        with missing_offline(f"the dataset of lm-eval task {task}"):
            results = simple_evaluate(
                lm, tasks=[task], num_fewshot=shots, gen_kwargs=gen_kwargs, log_samples=False, **options
            )
        rows += result_rows(results, model_state)
    return rows


def _common(values: set):
    """The one value of a set, else None."""
    return next(iter(values)) if len(values) == 1 else None


def aggregate(rows: list[dict], model_state: str) -> list[dict]:
    """Mean ± standard error over repeated evaluations (e.g. one edited model per request), per (task, metric).

    stderr is the standard error of the mean across runs; with a single run, that run's own stderr.
    n_models: the runs with a value; n_samples: each run's (None where they differ).
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["metric"]), []).append(row)
    out = []
    for (task, metric), runs in groups.items():
        values = [r["value"] for r in runs if r["value"] is not None]
        if len(values) > 1:
            stderr = statistics.stdev(values) / math.sqrt(len(values))
        else:
            stderr = runs[0]["stderr"] if len(runs) == 1 else None
        out.append(
            dict(
                model_state=model_state,
                task=task,
                metric=metric,
                value=statistics.fmean(values) if values else None,
                stderr=stderr,
                n_samples=_common({r.get("n_samples") for r in runs}),
                n_models=len(values),
            )
        )
    return out
