"""`muke edit --sequential`: batch t edited into the model as batches < t left it (muke.update.sequential)."""

from __future__ import annotations

import sys
import time

from muke.cli.rows import answers, questions, safe_name, score


def edit_sequential(run) -> list[dict]:
    """Every request's answers and target NLL right after its own batch (`own_*`, `nll_own`) and after the
    last batch (`generated`, `bleu`, `nll_post`, ... as in a single edit), so the difference shows what later
    edits undid. Prompts carry the run's chat settings (`EditRun.sequence`), as a single edit's do."""
    from muke.update.edit import target_nll
    from muke.update.sequential import SequentialEditor, batches_of

    em, requests = run.em, run.requests
    seqs = {r.id: run.sequence(r) for r in requests}
    nll_pre = {r.id: target_nll(em, seqs[r.id]) for r in requests}
    pre, own, rows = iter(run.generate(requests)), {}, []
    with SequentialEditor(em, run.args.method, run.preset, run.stats) as editor:
        for t, batch in enumerate(batches_of(requests, run.args.batch_size)):
            begin = time.perf_counter()
            update, _ = editor.edit(batch)
            seconds = (time.perf_counter() - begin) / len(batch)
            if run.out:
                update.save(run.out / "updates" / f"{t:04d}-{safe_name(batch[0].id)}.safetensors")
            given = iter(run.generate(batch))
            for r in batch:
                own[r.id] = (t, [next(given) for _ in questions(r)], target_nll(em, seqs[r.id]), seconds)
            print(
                f"muke: batch {t + 1} ({[r.id for r in batch]}) edited in {seconds:.1f} s per request", file=sys.stderr
            )
        final = iter(run.generate(requests))
        for r in requests:
            row = _row(run, r, own[r.id], (nll_pre[r.id], target_nll(em, seqs[r.id])), next(pre), next(final))
            if r.para_question:
                row.update(answers(r, next(pre), next(final), "para_"), para_question=r.para_question)
                row.update({f"own_para_{k}": v for k, v in score(own[r.id][1][1].text, r.answer).items()})
            rows.append(run.emit(row))
    return rows


def _row(run, r, own: tuple, nll: tuple, before, after) -> dict:
    """Request r's row: its own batch t, answers and NLL; nll = (before the first, after the last batch);
    the question's answers before the first and after the last batch."""
    t, given, nll_own, seconds = own
    row = run.row(r)
    row.update(batch=t, n_edits=len(run.requests), seconds=seconds, nll_pre=nll[0], nll_own=nll_own)
    row.update(answers(r, before, after), nll_post=nll[1])
    row.update({f"own_{k}": v for k, v in score(given[0].text, r.answer).items()}, own_generated=given[0].text)
    return row
