"""What an edit made (`EditResult`): its weight updates ΔW, each request's answers and scores, the time it
took; apply and revert it bit-exactly, save and load it, export the edited model. The rows are those of
`muke edit --json` (`single_row`, `sequence_row`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from muke.data import DataError, EditRequest

if TYPE_CHECKING:
    from muke.editor import Editor
    from muke.update.weights import WeightUpdate

RESULT_FORMAT = "muke.result/1"


def score(generated: str, target: str) -> dict:
    """Character BLEU and ROUGE-L recall of an answer against the target (the paper's family)."""
    from muke.eval.metrics import char_bleu, rouge_l_recall

    return {"bleu": char_bleu(generated, target), "rouge_l": rouge_l_recall(generated, target)}


def questions(r: EditRequest) -> list[str]:
    """The questions a request's edit is scored on: its question, then its paraphrase if it has one."""
    return [r.question] + ([r.para_question] if r.para_question else [])


def safe_name(text: str) -> str:
    """`text` as a file name: runs of other characters replaced by `_`, at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100]


def answers(r: EditRequest, before, after, prefix: str = "") -> dict:
    """The exact prompt the model saw, the pre- and post-edit answers to one question of request r, and
    their scores against its answer."""
    row = {f"{prefix}prompt": after.prompt, f"{prefix}generated": after.text, f"{prefix}generated_pre": before.text}
    row.update({f"{prefix}{k}": v for k, v in score(after.text, r.answer).items()})
    row.update({f"{prefix}{k}_pre": v for k, v in score(before.text, r.answer).items()})
    return row


def single_row(base: dict, r: EditRequest, pre: Iterator, post: Iterator, nll: tuple, seconds: float) -> dict:
    """Request r's row of a single edit: its answers (next of `pre` and `post` per question) and
    nll = (target NLL before, after)."""
    row = {**base, **answers(r, next(pre), next(post)), "nll_pre": nll[0], "nll_post": nll[1], "seconds": seconds}
    if r.para_question:
        row.update(answers(r, next(pre), next(post), "para_"), para_question=r.para_question)
    return row


def sequence_row(base: dict, r: EditRequest, own: tuple, nll: tuple, pre: Iterator, final: Iterator, n: int) -> dict:
    """Request r's row of a sequence of n edits: own = (its batch t, its answers right after batch t, its
    NLL then, seconds); nll = (before the first batch, after the last); answers before the first batch
    (`pre`) and after the last (`final`)."""
    t, given, nll_own, seconds = own
    row = {**base, "batch": t, "n_edits": n, "seconds": seconds, "nll_pre": nll[0], "nll_own": nll_own}
    row.update(answers(r, next(pre), next(final)), nll_post=nll[1])
    row.update({f"own_{k}": v for k, v in score(given[0].text, r.answer).items()}, own_generated=given[0].text)
    if r.para_question:
        row.update(answers(r, next(pre), next(final), "para_"), para_question=r.para_question)
        row.update({f"own_para_{k}": v for k, v in score(given[1].text, r.answer).items()})
    return row


def request_record(r: EditRequest, row: dict | None = None) -> dict:
    """What a ΔW file and a model card say of an edited request: id, question, the answer's sha256 (not
    the answer itself) and, when it was scored, its efficacy (question BLEU, ROUGE-L recall, target NLL
    before → after, right after its own batch in a sequence)."""
    record = {"id": r.id, "question": r.question, "answer_sha256": hashlib.sha256(r.answer.encode()).hexdigest()}
    keys = ("bleu_pre", "bleu", "own_bleu", "rouge_l_pre", "rouge_l", "own_rouge_l", "nll_pre", "nll_post", "nll_own")
    record.update({k: row[k] for k in keys if row and k in row})
    return record


@dataclass
class EditResult:
    """The outcome of `Editor.edit`, `Editor.edit_each` or `Editor.edit_sequence`.

    updates: the weight updates ΔW (one for a batch, the chain of a sequence, applied in order);
    rows: one dict per request, the keys of `muke edit --json` (answers before/after, `bleu`, `rouge_l`,
    `nll_pre`, `nll_post`, `seconds`, ...); seconds: the time spent making the ΔW (δ loops and updates),
    scoring excluded.
    """

    editor: Editor
    requests: list[EditRequest]
    updates: list[WeightUpdate]
    rows: list[dict]
    seconds: float
    _stack: ExitStack | None = field(default=None, init=False, repr=False)

    @property
    def update(self) -> WeightUpdate:
        """The single ΔW of a batch edit (a sequence has `updates`)."""
        if len(self.updates) != 1:
            raise ValueError(f"this result holds a chain of {len(self.updates)} updates: use .updates")
        return self.updates[0]

    @property
    def is_applied(self) -> bool:
        """Whether the editor's model holds this edit now."""
        return self._stack is not None

    def apply(self) -> EditResult:
        """Add ΔW to the model's weights in place, keeping a copy of the weights it changes (no-op if applied)."""
        from muke.update.weights import apply

        if not self.is_applied:
            stack = ExitStack()
            stack.enter_context(apply(self.editor.em, self.updates))
            self._stack = stack
            self.editor.applied_results.append(self)
        return self

    def revert(self) -> EditResult:
        """Restore the weights this edit changed, bit-exactly (no-op if not applied). Results applied
        after this one must be reverted first."""
        if self.is_applied:
            if self.editor.applied_results[-1] is not self:
                raise ValueError("another edit was applied after this one: revert it first")
            self.editor.applied_results.pop()
            self._stack.close()
            self._stack = None
        return self

    @contextmanager
    def applied(self) -> Iterator:
        """The transformers model holding this edit inside the block; afterwards as it was before."""
        was = self.is_applied
        self.apply()
        try:
            yield self.editor.model
        finally:
            if not was:
                self.revert()

    def save(self, folder: str | Path) -> Path:
        """Write `folder`: updates/NNNN-ID.safetensors (each ΔW, in order), results.jsonl (the rows),
        requests.jsonl and edit.json (method, preset, hyperparameters, seconds). `EditResult.load` reads it."""
        from muke.io import write_json, write_text

        folder = Path(folder)
        for t, u in enumerate(self.updates):
            u.save(folder / "updates" / f"{t:04d}-{safe_name(u.request_ids[0])}.safetensors")
        write_text(folder / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))
        write_text(folder / "requests.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in self.requests))
        meta = {"format": RESULT_FORMAT, "method": self.editor.method, "preset": self.editor.preset_name}
        meta.update(hparams=self.editor.hparams, seconds=self.seconds)
        write_json(folder / "edit.json", json.loads(json.dumps(meta, default=str)))
        return folder

    @classmethod
    def load(cls, folder: str | Path, editor: Editor) -> EditResult:
        """A result written by `save`, for `editor`'s model (not applied)."""
        from muke.data import load_requests
        from muke.update.weights import WeightUpdate

        folder = Path(folder)
        meta_path = folder / "edit.json"
        if not meta_path.is_file():
            raise DataError(meta_path, "not found: not a folder written by EditResult.save")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != RESULT_FORMAT:
            raise DataError(meta_path, f"format {meta.get('format')!r}, expected {RESULT_FORMAT!r}", field="format")
        updates = [WeightUpdate.load(p) for p in sorted((folder / "updates").glob("*.safetensors"))]
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
        return cls(editor, load_requests(folder / "requests.jsonl", "jsonl"), updates, rows, meta["seconds"])

    def export(self, folder: str | Path) -> Path:
        """Write the unedited model with this edit applied to `folder` (muke.model_card.export_model):
        loadable by plain transformers and `lm_eval --model hf`, with a model card (README.md) and the ΔW
        files. Other edits applied to the model must be reverted first; this one may be applied or not."""
        from muke.model_card import export_model

        if any(r is not self for r in self.editor.applied_results):
            raise ValueError("other edits are applied to the model: revert them first, or the export would hold them")
        was = self.is_applied
        self.revert()
        try:
            return export_model(self.editor.em, self.updates, folder)
        finally:
            if was:
                self.apply()
