"""The paper's case study (App. C) as HTML: per request, the target beside the pre-edit answer and each
method's edited answer, each answer highlighted from the first character where it leaves the target."""

from __future__ import annotations

import html

import pandas as pd

PRE_EDIT = "pre-edit"
# For the report's stylesheet (without it <mark> keeps the browser's yellow); an answer without spaces
# ("daboatschu.daboatschu…") breaks anywhere instead of widening its column past the page.
CSS = "mark.diverge{background:#ffe08a}.case-study td{min-width:14em;overflow-wrap:anywhere}"
CAPTION = (
    "Answers and targets with whitespace runs collapsed to one space. Plain: the answer's prefix that "
    "equals the target's; highlighted: from the first differing character on. Under each answer: "
    "how many target characters it reproduced."
)


def normalise(text: str) -> str:
    """Strip, and collapse every run of whitespace (spaces, tabs, newlines) to one space."""
    return " ".join(text.split())


def first_divergence(output: str, target: str) -> int:
    """Index of the first character where normalise(output) differs from normalise(target); -1 when the
    normalised target is a prefix of the normalised output (the whole target reproduced, anything may
    follow). When the output stops early, the index is its normalised length. The index is the same in
    both normalised strings, and equals the number of target characters reproduced."""
    o, t = normalise(output), normalise(target)
    for k, (a, b) in enumerate(zip(o, t)):
        if a != b:
            return k
    return -1 if len(o) >= len(t) else len(o)


def reproduced(output: str, target: str) -> int:
    """Target characters (normalised) that the output reproduces from the start: the length of the common prefix."""
    k = first_divergence(output, target)
    return len(normalise(target)) if k == -1 else k


def _answer_cell(output: str, target: str) -> str:
    """Escaped normalised answer: the reproduced prefix plain, the rest in <mark class='diverge'>, and the count."""
    o, k, n = normalise(output), reproduced(output, target), len(normalise(target))
    tail = f"<mark class='diverge'>{html.escape(o[k:])}</mark>" if o[k:] else ""
    return f"<td>{html.escape(o[:k])}{tail}<div class='caption'>{k} / {n} target characters</div></td>"


UNRELATED = "unrelated"  # rows of this kind: the unrelated prompts' answers (muke.eval.tables.unrelated_rows)
N_UNRELATED = 3
UNRELATED_CAPTION = (
    f"Under each request: {N_UNRELATED} unrelated prompts (the first prompt of each of the first "
    f"{N_UNRELATED} prompt kinds in the prompt file's order; with the shipped prompts a question, an "
    "instruction and a code prompt), "
    "the unedited model's answer and each method's after this request's edit, highlighted from the "
    "first character where it leaves the unedited answer."
)


def unrelated_prompts(rows: pd.DataFrame, n: int = N_UNRELATED) -> list:
    """The prompt ids every block shows: the first prompt of each of the first `n` kinds, in order of
    first appearance (the prompt file's order); fewer than `n` kinds: the next prompts, in that order."""
    order = rows.drop_duplicates("prompt_id")
    firsts = order.drop_duplicates("prompt_kind")["prompt_id"].tolist()[:n]
    rest = [p for p in order["prompt_id"] if p not in firsts]
    chosen = set(firsts + rest[: n - len(firsts)])
    return [p for p in order["prompt_id"] if p in chosen]


def _change_cell(output: str, pre: str) -> str:
    """Escaped normalised edited answer: the prefix it shares with the unedited answer plain, the rest
    marked, and under it "unchanged" or "changed" with the number of characters kept."""
    o, k = normalise(output), reproduced(output, pre)
    if o == normalise(pre):
        return f"<td>{html.escape(o)}<div class='caption'>unchanged</div></td>"
    tail = f"<mark class='diverge'>{html.escape(o[k:])}</mark>" if o[k:] else ""
    return f"<td>{html.escape(o[:k])}{tail}<div class='caption'><b>changed</b>: first {k} characters kept</div></td>"


def _unrelated(rid: str, rows: pd.DataFrame, prompts: list, methods: list[str]) -> str:
    """The block's unrelated prompts: a row per prompt (kind, text, unedited answer, each method's)."""
    mine = rows[rows["id"] == rid]
    if not len(mine):
        return (
            "<p class='caption'>Unrelated prompts: not measured for this request (locality measures "
            "the edits of the first <code>locality.edits</code> requests only).</p>"
        )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["unrelated prompt", "unedited", *methods])
    body = []
    for pid in prompts:
        here = mine[mine["prompt_id"] == pid]
        ref = rows[rows["prompt_id"] == pid].iloc[0]
        answers = dict(zip(here["method"], zip(here["output"], here["pre"])))
        pres = dict.fromkeys(normalise(p) for p in (here["pre"] if len(here) else [ref["pre"]]))
        cells = [f"<td><i>{html.escape(ref['prompt_kind'])}</i>: {html.escape(ref['question'])}</td>"]
        cells += ["<td>" + "<hr>".join(map(html.escape, pres)) + "</td>"]
        cells += [_change_cell(*answers[m]) if m in answers else "<td>not measured</td>" for m in methods]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f"<div class='scroll'><table class='text unrelated'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _block(rid: str, group: pd.DataFrame, methods: list[str], unrelated: str = "") -> str:
    target, question = group["target"].iloc[0], group["question"].iloc[0]
    answers = dict(zip(group["method"], group["output"]))
    cells = [f"<td>{html.escape(normalise(target))}</td>"]
    cells += [_answer_cell(answers[m], target) if m in answers else "<td>—</td>" for m in methods]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["target", *methods])
    return (
        f"<section class='case-study'><h3>{html.escape(str(rid))}</h3>"
        f"<p><b>Question:</b> {html.escape(question)}</p>"
        f"<div class='scroll'><table class='text'><thead><tr>{head}</tr></thead>"
        f"<tbody><tr>{''.join(cells)}</tr></tbody></table></div>{unrelated}</section>"
    )


def case_study_html(rows: pd.DataFrame, kind: str = "question", limit: int | None = None) -> str:
    """HTML of the case study: CAPTION, then one <section class='case-study'> per request (first `limit`).

    rows: columns id, method, output, target, question (generation_rows' `prompt` renamed to `question`)
    and optionally kind, of which only `kind` rows are shown. The method "pre-edit" (the unedited
    model's answers) comes first, the other methods in order of first appearance; one column each, "—"
    where a method has no answer. Requests in order of first appearance. All text is HTML-escaped.
    Rows of kind UNRELATED (prompt_id, prompt_kind, question, pre, output: muke.eval.tables.unrelated_rows)
    add to each block the `unrelated_prompts` with the unedited answer and each edited method's, or a
    "not measured" line for a request without them; without such rows the blocks have none.
    """
    extra = rows[rows["kind"] == UNRELATED] if "kind" in rows else rows.iloc[:0]
    rows = rows[rows["kind"] == kind] if "kind" in rows else rows
    duplicated = rows.duplicated(["id", "method"])
    if duplicated.any():
        pairs = rows[duplicated][["id", "method"]].values.tolist()
        raise ValueError(f"several {kind!r} answers for (id, method): {pairs}")
    methods = list(dict.fromkeys(rows["method"]))
    methods = ([PRE_EDIT] if PRE_EDIT in methods else []) + [m for m in methods if m != PRE_EDIT]
    ids = list(dict.fromkeys(rows["id"]))[:limit]
    edited = [m for m in methods if m != PRE_EDIT]
    prompts = unrelated_prompts(extra) if len(extra) else []

    def unrelated(rid) -> str:
        return _unrelated(rid, extra, prompts, edited) if prompts else ""

    blocks = [_block(rid, rows[rows["id"] == rid], methods, unrelated(rid)) for rid in ids]
    caption = CAPTION + (" " + UNRELATED_CAPTION if prompts else "")
    return f"<p class='caption'>{html.escape(caption)}</p>" + "".join(blocks)
