"""generate: answers to each request's questions, by the model edited with that request's ΔW
(or by the unedited model). Each generate batch's rows are kept in a part file tagged with the job's
identity, so a killed job resumes after the batches it finished."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from muke.io import write_json, write_parquet
from muke.workflow.stages.command import command
from muke.workflow.stages.common import (
    load_model,
    log,
    read_chain,
    read_update_index,
    shard_requests,
    write_manifest,
)

COLUMNS = ["id", "kind", "index", "prompt", "output", "target", "n_tokens", "seconds", "edit_failed"]


def generation_groups(sizes: list[int], batch_size: int) -> list[tuple[int, int]]:
    """Greedy [start, end) ranges of consecutive edits whose answers (sizes[i] each) fit one generate
    batch of `batch_size` rows; a larger edit forms a group of its own. A function of the edits alone,
    so a resumed job forms the same batches (hence the same outputs) as an uninterrupted one."""
    out, start, rows = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and rows + n > batch_size:
            out.append((start, i))
            start, rows = i, 0
        rows += n
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def parts_dir(out: Path) -> Path:
    """The folder beside a stage's output where its job keeps what it finished (removed at the end)."""
    return out.with_name(out.stem + ".parts")


def read_part(path: Path, identity: str, **same) -> dict | None:
    """A JSON part file that a job of this identity wrote (with these `same` values, where given), else None."""
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    matches = part.get("identity") == identity and all(part.get(key) == value for key, value in same.items())
    return part if matches else None


def _edits(chosen: dict, update: str | Path | None) -> list[tuple[list[str], Path | None]]:
    """(request ids, ΔW file or None) of each edit of the shard, in the shard's order (failed rows first)."""
    if update is None:
        return [([rid], None) for rid in chosen]
    order = {rid: i for i, rid in enumerate(chosen)}
    edits = [(entry["request_ids"], entry["path"]) for entry in read_update_index(update)]
    return sorted(edits, key=lambda edit: order[edit[0][0]])


def _decoding(g: dict):
    """The decoding protocol of the generation settings (muke.eval.generate.Decoding)."""
    from muke.eval.generate import PAPER_SEED, Decoding

    return Decoding(g.get("protocol", "greedy"), g.get("seed", PAPER_SEED))


def _answer(em, group: list, chosen: dict, edited: bool, g: dict) -> list[dict]:
    """Rows of one generate batch: each edit's answers by the model with its ΔW (or unedited)."""
    from muke.eval.generate import edited_generation_rows
    from muke.update.weights import WeightUpdate

    failed = [edited and path is None for _, path in group]
    for (request_ids, _), bad in zip(group, failed):
        if bad:
            log(f"{request_ids}: edit failed, answering with the unedited model")
    answers = edited_generation_rows(
        em,
        [
            (None if path is None else WeightUpdate.load(path), [chosen[rid] for rid in request_ids])
            for request_ids, path in group
        ],
        kinds=g["kinds"],
        max_new_tokens=g["max_new_tokens"],
        system_prompt=g["system_prompt"],
        chat_template=g["chat_template"],
        batch_size=g["batch_size"],
        decoding=_decoding(g),
    )
    return [{**row, "edit_failed": bad} for edit_rows, bad in zip(answers, failed) for row in edit_rows]


def _edited_by_chain(em, chain: str | Path, n_edits: int):
    """(the model with the chain's first n_edits edits added in place one by one, as edit_sequence added
    them, the ids whose batch failed)."""
    from muke.update.weights import WeightUpdate, add

    files, failed = read_chain(chain, n_edits)
    log(f"adding the first {len(files)} weight updates of {chain} ({n_edits} edits)")
    for path in files:
        add(em, WeightUpdate.load(path))
    return em, failed


@command(
    "answers of one shard, edited or not",
    update="update_weights index (omit: the unedited model)",
    chain="edit_sequence chain index: answer with the model edited by its first n_edits edits",
)
def generate(
    spec: dict,
    model: str | Path,
    requests: str | Path,
    shard: int,
    out: str | Path,
    update: str | Path | None = None,
    device: str = "auto",
    chain: str | Path | None = None,
) -> Path:
    """Answers to each request's questions (question, paraphrase, sub-questions), decoded by
    `generation.protocol` (greedy, or the paper's sampling: muke.eval.generate.Decoding); the manifest
    records the effective decoding settings (`decoding`: for the paper protocol the model's top_k, top_p,
    repetition_penalty) and the host the job ran on.

    With `update` (an update_weights index) each request is answered by the model edited with its own
    batch's ΔW alone; without it by the unedited model (method "pre-edit"). A request whose edit
    failed is answered by the unedited model and flagged `edit_failed`. Low-rank ΔW of several edits
    share generate batches of `generation.batch_size` rows (muke.eval.generate.edited_generation_rows).
    With `chain` (editing.mode sequential) every request is answered by one model: the unedited one plus
    the chain's updates up to the spec's n_edits edits; a request whose batch failed is flagged `edit_failed`.
    Parquet rows: id, kind, index, prompt, output, target, tokens, seconds, edit_failed, shard.
    """
    p, out = spec["params"], Path(out)
    chosen = {r.id: r for r in shard_requests(requests, p["selection"], shard)}
    load = functools.cache(lambda: load_model(model, p["dtype"], device))
    rows = _answer_shard(spec, chosen, update, chain, load, parts_dir(out))
    write_parquet(_shard_frame(rows, chosen, shard), out)
    # the decoding settings need the model's generation config, also where every batch finished earlier
    write_manifest(out.parent / "manifest.json", spec, decoding=_decoding(p["generation"]).settings(load()))
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return out


def _answer_shard(spec: dict, chosen: dict, update, chain, load, parts: Path) -> list[dict]:
    """Rows of every generate batch of the shard: a batch a killed job finished is read from its part
    file, the others answered (by the model `load` gives, plus the chain's edits) and kept in theirs."""
    from muke.eval.generate import n_questions

    p, g = spec["params"], spec["params"]["generation"]
    edits = _edits(chosen, update)
    groups = generation_groups(
        [sum(n_questions(chosen[rid], g["kinds"]) for rid in ids) for ids, _ in edits], g["batch_size"]
    )
    edited = functools.cache(
        lambda: (load(), set()) if chain is None else _edited_by_chain(load(), chain, p["n_edits"])
    )
    rows = []
    for k, (a, b) in enumerate(groups):
        ids = [rid for request_ids, _ in edits[a:b] for rid in request_ids]
        path = parts / f"{k:05d}.json"
        part = read_part(path, spec["identity"], ids=ids)
        if part is not None:
            log(f"batch {k + 1}/{len(groups)} {ids}: finished earlier (part file)")
            rows += part["rows"]
            continue
        log(f"batch {k + 1}/{len(groups)}: generating for {ids}")
        em, failed = edited()
        done = [
            {**row, "edit_failed": row["edit_failed"] or row["id"] in failed}
            for row in _answer(em, edits[a:b], chosen, update is not None, g)
        ]
        write_json(path, {"identity": spec["identity"], "ids": ids, "rows": done})
        rows += done
    return rows


def _shard_frame(rows: list[dict], chosen: dict, shard: int):
    """The shard's rows in the requests' order (then kind, index), `n_tokens` named `tokens`."""
    import pandas as pd

    order = {rid: i for i, rid in enumerate(chosen)}
    df = pd.DataFrame(rows, columns=COLUMNS).rename(columns={"n_tokens": "tokens"})
    df = df.sort_values(["id", "kind", "index"], key=lambda c: c.map(order) if c.name == "id" else c, kind="stable")
    return df.assign(shard=shard).reset_index(drop=True)
