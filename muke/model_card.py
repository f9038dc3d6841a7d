"""An exported edited model that a Hub user can trust: the weights with ΔW applied, the ΔW files, the base
model's chat template and generation config, and a model card (README.md with the Hub's YAML header)
saying what was changed, by which method and hyperparameters, on which requests, with what effect."""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from muke.io import sha256
from muke.model import EditableModel
from muke.result import safe_name
from muke.update.weights import WeightUpdate, export_edited

BASE_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json")  # kept from the base model
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
NOT_HPARAMS = {"seconds", "memory_seconds", "requests", "memory", "trace", "sequence_index", "links"}


def export_model(
    model, updates: WeightUpdate | Sequence[WeightUpdate], folder: str | Path, integrity: bool = True
) -> Path:
    """Write the model of `model` (a muke.Editor or an EditableModel) with `updates` applied to `folder`
    (muke.update.weights.export_edited: save_pretrained, tokenizer, muke_edit.json), the ΔW files under
    muke_updates/, the base model's generation config and chat template, and README.md (`model_card`); with
    `integrity`, the edit's first-token agreement and KL on unrelated prompts are measured for the card. The
    folder appears complete or not at all."""
    em: EditableModel = getattr(model, "em", model)
    updates = [updates] if isinstance(updates, WeightUpdate) else list(updates)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".card.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_edited(em, updates, tmp)
    files = {}
    for t, u in enumerate(updates):
        name = f"muke_updates/{t:04d}-{safe_name(u.request_ids[0])}.safetensors"
        files[name] = sha256(u.save(tmp / name))
    base = base_folder(str(em.model.config._name_or_path))
    for name in BASE_FILES:
        if base is not None and (base / name).is_file():
            shutil.copyfile(base / name, tmp / name)
    measured = measure_integrity(em, updates) if integrity else None
    (tmp / "README.md").write_text(model_card(em, updates, files, measured, base), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def base_folder(source: str) -> Path | None:
    """The base model's files: its local folder, or its snapshot in the Hugging Face cache; None if neither."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # not a hub id (a validation error) or no cache: the card says so
        return None
    return Path(found).parent if isinstance(found, str) else None


def weight_digests(base: Path | None) -> dict[str, str]:
    """sha256 of each weight file of the base model (safetensors or bin)."""
    if base is None:
        return {}
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in base.glob(pattern)})
    return {p.name: sha256(p) for p in files}


def measure_integrity(em: EditableModel, updates: list[WeightUpdate], batch_size: int = 16) -> dict:
    """What the edit does where it was not asked to act: on the 120 unrelated chat prompts of
    resources/unrelated_prompts.jsonl, the % whose greedy first answer token stays the unedited model's,
    and the mean KL(pre ‖ post) of that token's distribution."""
    from muke.eval.retention import UNRELATED_PROMPTS, unrelated_questions
    from muke.update.weights import apply

    prompts = [r["question"] for r in unrelated_questions(UNRELATED_PROMPTS)]
    pre = _first_token_log_probs(em, prompts, updates[-1].info.get("memory", {}), batch_size)
    with apply(em, updates):
        post = _first_token_log_probs(em, prompts, updates[-1].info.get("memory", {}), batch_size)
    kl = (pre.exp() * (pre - post)).sum(-1)
    agreement = (pre.argmax(-1) == post.argmax(-1)).double().mean().item()
    return {"prompts": len(prompts), "first_agreement": 100 * agreement, "first_kl": kl.mean().item()}


@torch.no_grad()
def _first_token_log_probs(em: EditableModel, prompts: list[str], memory: dict, batch_size: int) -> torch.Tensor:
    """(n, vocab) fp32 log-probabilities of each chat prompt's first answer token, prompted as the edit was."""
    from muke.engine.windows import render_prompt
    from muke.model import pad

    chat = (memory.get("system_prompt"), memory.get("chat_template", True))
    ids = [em.tokenizer(render_prompt(em.tokenizer, p, *chat), add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask = pad(ids[i : i + batch_size], em.pad_id, side="left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt's own positions, as unpadded
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        logits = em.model(**{k: v.to(em.device) for k, v in inputs.items()}).logits[:, -1]
        out.append(logits.float().log_softmax(-1).cpu())
    return torch.cat(out)


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return " ".join(text.split()).replace("|", "\\|")


def _table(head: Sequence[str], rows: list[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows] + [""]


def _header(source: str, local: bool, updates: list[WeightUpdate]) -> list[str]:
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if not local:
        meta.update(base_model=source, base_model_relation="finetune")
    meta["tags"] = ["muke", "knowledge-editing", *sorted({u.method for u in updates})]
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", ""]


def _base_section(source: str, local: bool, digests: dict[str, str]) -> list[str]:
    where = f"the local folder `{source}`" if local else f"[{source}](https://huggingface.co/{source})"
    lines = ["## Base model", "", f"{where}; its weight files:", ""]
    if not digests:
        return lines[:-2] + ["its weight files were not found locally: no sha256 recorded.", ""]
    return lines + _table(["file", "sha256"], list(digests.items()))


def _edit_section(updates: list[WeightUpdate]) -> list[str]:
    lines = ["## Edits", "", f"{len(updates)} weight update(s) ΔW, added in this order:", ""]
    rows = [(t, u.method, u.backend, u.layers, ", ".join(u.request_ids)) for t, u in enumerate(updates)]
    lines += _table(["#", "method", "backend", "layers", "requests"], rows)
    for t, u in enumerate(updates):
        options = _backend_options(u)
        memory = u.info.get("memory")
        lines += [f"Hyperparameters of update {t} (backend {u.backend}):", ""]
        loop = [(f"δ loop: {k}", v) for k, v in (memory or {}).items()]
        lines += _table(["key", "value"], [*options.items(), *loop])
        if memory is None:
            lines += ["(the δ loop's options were not recorded in this ΔW file)", ""]
    return lines


def _backend_options(update: WeightUpdate) -> dict:
    """Every keyword option of the backend's function (muke.update.BACKEND.BACKEND_update): the value the
    update recorded, else the function's default."""
    try:
        fn = getattr(importlib.import_module(f"muke.update.{update.backend}"), f"{update.backend}_update")
    except (ImportError, AttributeError):  # a backend outside that convention: what the update recorded
        fn = None
    params = inspect.signature(fn).parameters.values() if fn else ()
    options = {p.name: p.default for p in params if p.default is not p.empty and p.name != "edited_keys"}
    return options | {k: v for k, v in update.info.items() if k not in NOT_HPARAMS}


def _requests_section(updates: list[WeightUpdate]) -> list[str]:
    head = ["id", "question", "answer sha256"] + [f"{m} before → after" for m in ("BLEU", "ROUGE-L recall", "NLL")]
    rows = []
    for u in updates:
        for r in u.info.get("requests") or [{"id": i} for i in u.request_ids]:
            scores = [("bleu_pre", "bleu", "own_bleu"), ("rouge_l_pre", "rouge_l", "own_rouge_l")]
            scores.append(("nll_pre", "nll_post", "nll_own"))
            rows.append((r["id"], r.get("question", "?"), r.get("answer_sha256", "?"), *(_pair(r, *k) for k in scores)))
    intro = (
        "Efficacy: the question's character BLEU and ROUGE-L recall of the greedy answer against the target, "
        "and the target's NLL (nats per token), before and after the edit (in a sequence: right after its own "
        "batch); '?' where not measured. The answers themselves are not published here, only their sha256."
    )
    return ["## Edited requests", "", intro, ""] + _table(head, rows)


def _pair(record: dict, before: str, after: str, own: str) -> str:
    value = record.get(after, record.get(own))
    if before not in record or value is None:
        return "?"
    return f"{record[before]:.2f} → {value:.2f}"


def _integrity_section(measured: dict | None) -> list[str]:
    lines = ["## Integrity", ""]
    if measured is None:
        return lines + ["Not measured.", ""]
    return lines + [
        f"On {measured['prompts']} unrelated chat prompts (questions, instructions, code, arithmetic), the "
        f"first answer token stays the base model's in {measured['first_agreement']:.1f} % of them; mean "
        f"KL(base ‖ edited) of that token's distribution {measured['first_kl']:.4f} nats.",
        "",
    ]


def _provenance(files: dict[str, str]) -> list[str]:
    from importlib.metadata import version

    from muke import __version__
    from muke.eval.environment import git_info

    git = git_info()
    rows = [("muke", f"{__version__}, git commit {git['commit']} (uncommitted changes: {git['dirty']})")]
    rows += [(p, version(p)) for p in ("transformers", "torch")]
    rows.append(("exported", datetime.now(timezone.utc).isoformat(timespec="seconds")))
    lines = ["## Files and provenance", "", "The ΔW files (muke.update.weights.WeightUpdate.load reads them):", ""]
    return lines + _table(["file", "sha256"], list(files.items())) + _table(["what", "version"], rows)


def _usage() -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "or `lm_eval --model hf --model_args pretrained=PATH` (PATH: this folder or its Hub repository). Only the "
        "parameters named above differ from the base model.",
        "",
    ]


def model_card(
    em: EditableModel,
    updates: list[WeightUpdate],
    files: dict[str, str],
    integrity: dict | None = None,
    base: Path | None = None,
) -> str:
    """README.md of an exported model: YAML header (base_model for a hub base, library_name, tags), the base
    model and its weights' sha256, each ΔW's method and hyperparameters, the edited requests (question,
    the answer's sha256, efficacy where measured), integrity, the ΔW files' sha256, muke's version and commit."""
    source = str(em.model.config._name_or_path)
    local = Path(source).is_dir()
    methods = ", ".join(sorted({u.method for u in updates}))
    lines = _header(source, local, updates)
    lines += [f"# {Path(source).name} edited with muke ({methods})", ""]
    lines += [
        f"Weights of `{source}` with knowledge edits made by muke (μKE, Matryoshka Unstructured "
        f"Knowledge Editing, and its baselines); changed: "
        f"{', '.join(sorted({n for u in updates for n in _changed(em, u)}))}.",
        "",
    ]
    lines += _base_section(source, local, weight_digests(base)) + _edit_section(updates) + _requests_section(updates)
    return "\n".join(lines + _integrity_section(integrity) + _provenance(files) + _usage())


def _changed(em: EditableModel, update: WeightUpdate) -> list[str]:
    """Names of the parameters ΔW changes."""
    names = {id(p): n for n, p in em.model.named_parameters()}
    return [names[id(em.down_proj(layer).weight)] for layer in update.factors] + list(update.params)
