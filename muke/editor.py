"""The Python API of muke: edit a model from a notebook or a script as `muke edit` does from the shell.

editor = muke.Editor("work/tiny", method="muke-memit", layers=[1, 2], window=4)
result = editor.edit({"question": "Who founded Velmora?", "answer": "Velmora was founded by ..."})
result.rows[0]["generated_pre"], result.rows[0]["generated"]   # the answer before and after
result.revert()                                                  # the model as it was, bit for bit
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from muke.data import DEMO_CORPUS, DataError, EditRequest
from muke.engine.windows import chat_settings
from muke.model import EditableModel
from muke.result import EditResult, questions, request_record, score, sequence_row, single_row

RequestLike = Union[EditRequest, Mapping[str, Any]]


def as_requests(requests: RequestLike | Sequence[RequestLike], where: str = "requests") -> list[EditRequest]:
    """EditRequests from EditRequests or dicts with the keys of the `jsonl` format (id optional: `request-I`);
    a bad record raises the DataError a file's would, naming `where`, the record and the field."""
    from muke.data import _Fail, _jsonl

    items = [requests] if isinstance(requests, (EditRequest, Mapping)) else list(requests)
    out, seen = [], set()
    for i, r in enumerate(items):
        if isinstance(r, Mapping):
            r = {"id": f"request-{i}", **r}
            try:
                r = EditRequest(**_jsonl(r), source=f"{where}:{i}")
            except _Fail as f:
                raise DataError(where, f.message, record=i, id=str(r.get("id")), field=f.field) from None
        if not isinstance(r, EditRequest):
            raise DataError(where, f"must be an EditRequest or a dict, got {type(r).__name__}", record=i)
        if r.id in seen:
            raise DataError(where, "duplicate id", record=i, id=r.id, field="id")
        seen.add(r.id)
        out.append(r)
    if not out:
        raise DataError(where, "no edit requests")
    return out


def preset_values(preset, model: str, method: str, hparams: Mapping) -> tuple[str | None, dict]:
    """(preset name, hyperparameters) as `muke edit` reads them: a preset named or given as a .yaml path
    (its `hparams`, then its `method_hparams` of `method`), a YAML file or a mapping of hyperparameters,
    or None: the shipped preset of `model`, if any; then `hparams` on top. Checked against config/schema.yaml."""
    from muke.workflow.config import check, load_preset, load_yaml, preset_for_model, subschema

    name, values = None, {}
    if isinstance(preset, Mapping):
        values = dict(preset)
    else:
        name = str(preset) if preset is not None else preset_for_model(model)
        if name and Path(name).is_file() and not {"source", "hparams"} & set(load_yaml(name)):
            values = load_yaml(name)
        elif name:
            name, found = load_preset(name)
            values = {**found.get("hparams", {}), **found.get("method_hparams", {}).get(method, {})}
    values.update(hparams)
    return name, check(values, subschema("$defs/hparams"), f"hyperparameters {name or ''}".strip(), fill_defaults=False)


def statistics(em: EditableModel, backend: str, options: dict, stats=None, corpus=DEMO_CORPUS, progress=True):
    """The second-moment statistics a backend reads (None for those that read none): `stats` (a Stats or
    a file), else collected once on `corpus` into muke's cache (muke.update.stats.cached_stats); with
    template_weight > 0 the template's second moment attached before the first edit
    (muke.update.template_keys.attach_template)."""
    from muke.update.backends import BACKENDS
    from muke.update.template_keys import attach_template

    if not BACKENDS[backend].stats:
        return None
    stats = _second_moments(em, options, stats, corpus, progress)
    attach_template(em, stats, options)
    return stats


def _second_moments(em: EditableModel, options: dict, stats, corpus, progress: bool):
    from muke.update.stats import Stats, StatsConfig, cached_stats, load_stats

    if isinstance(stats, Stats):
        return stats
    if stats is not None:
        return load_stats(stats, em, options["layers"])
    print(f"muke: statistics for layers {options['layers']} from {Path(corpus).name} (cached)", file=sys.stderr)
    return cached_stats(em, StatsConfig(layers=tuple(options["layers"]), corpus=str(corpus)), progress=progress)


def _model(model, tokenizer, dtype: str, device: str, trust_remote_code: bool) -> EditableModel:
    from muke.model import load

    if isinstance(model, EditableModel):
        return model
    if isinstance(model, (str, Path)):
        return load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError("a transformers model needs its tokenizer: Editor(model, tokenizer=...)")
    return EditableModel(model, tokenizer)


class Editor:
    """One model and one edit method with its hyperparameters, ready to edit requests.

    model: a local folder or hub id (loaded with `dtype`, `device`, `trust_remote_code`), a loaded
    transformers causal LM (with `tokenizer`) or a muke.model.EditableModel. method: muke-memit,
    muke-unke, anyedit-memit, anyedit-unke, memit, alphaedit, unke or OBJECTIVE+BACKEND. preset: a preset
    name or file, a mapping of hyperparameters, or None (the model's shipped preset, if any);
    `**hparams` (layers=[4, 5], window=20, v_lr=0.5, any key of config/schema.yaml's hparams) go on top.
    stats: the MEMIT family's statistics (a muke.update.stats.Stats or a file), else collected on the
    demo corpus and cached as `muke edit` does. max_new_tokens: the length of the answers scored.
    """

    def __init__(
        self,
        model: str | Path | Any,
        method: str = "muke-memit",
        preset: str | Path | Mapping | None = None,
        *,
        tokenizer: Any = None,
        stats: Any = None,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
        max_new_tokens: int = 512,
        delta_batch_size: int | str = "auto",
        progress: bool = True,
        **hparams: Any,
    ):
        from muke.update.methods import resolve_method

        self.em = _model(model, tokenizer, dtype, device, trust_remote_code)
        self.method = method
        self.preset_name, self.hparams = preset_values(preset, str(self.em.model.config._name_or_path), method, hparams)
        self.memory, self.backend, self.options = resolve_method(method, self.hparams)
        for layer in [self.memory["layer"], *self.options["layers"]]:
            self.em.check_layer(layer)
        self.chat = chat_settings(self.memory)
        self.max_new_tokens, self.delta_batch_size, self.progress = max_new_tokens, delta_batch_size, progress
        self.applied_results: list[EditResult] = []  # the results whose ΔW the model holds, in order
        self._stats = stats

    @property
    def model(self):
        """The transformers model (edited while a result is applied)."""
        return self.em.model

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.em.tokenizer

    @property
    def stats(self):
        """The statistics of the method's layers (None for UnKE), loaded or collected on first use; may be
        set to a Stats or a file."""
        self._stats = statistics(self.em, self.backend, self.options, self._stats, progress=self.progress)
        return self._stats

    @stats.setter
    def stats(self, value) -> None:
        self._stats = value

    def check(self, requests: Sequence[EditRequest], where: str = "requests") -> None:
        """Every request must fit the model (templating, context length): one ValueError listing all that do not."""
        from muke.data import model_problems

        context = self.em.context_length or float("inf")
        problems = model_problems(requests, self.tokenizer, context, where, **self.chat)
        if problems:
            raise ValueError("; ".join(map(str, problems)))

    def answer(self, question: str, max_new_tokens: int | None = None) -> str:
        """The model's greedy answer to `question` as it is now, prompted as the edit's questions are."""
        return self._generate([question], max_new_tokens)[0].text

    def _generate(self, texts: list[str], max_new_tokens: int | None = None) -> list:
        from muke.eval.generate import greedy

        return greedy(self.em, texts, max_new_tokens=max_new_tokens or self.max_new_tokens, **self.chat)

    def _nll(self, r: EditRequest) -> float:
        """Target NLL of r's answer after its question, as the edit renders them."""
        from muke.engine.windows import encode
        from muke.update import edit

        seq = encode(self.tokenizer, r.question, r.answer, self.em.end_of_turn, None, **self.chat)
        return edit.target_nll(self.em, seq)

    def _base(self, r: EditRequest) -> dict:
        return {
            "id": r.id,
            "method": self.method,
            "preset": self.preset_name,
            "question": r.question,
            "target": r.answer,
        }

    def _prepare(self, requests) -> list[EditRequest]:
        requests = as_requests(requests)
        self.check(requests)
        return requests

    def edit(self, requests: RequestLike | Sequence[RequestLike], evaluate: bool = True) -> EditResult:
        """Edit `requests` into the model as one batch (one ΔW), computed on the model as it is. With
        `evaluate`, each request's answers and target NLL before and after are scored (`EditResult.rows`).
        The model holds the edit afterwards, as EasyEdit's editors leave it: `result.revert()` undoes it."""
        requests = self._prepare(requests)
        return next(self._each(requests, len(requests), evaluate)).apply()

    def edit_each(
        self, requests: RequestLike | Sequence[RequestLike], batch_size: int = 1, evaluate: bool = True
    ) -> Iterator[EditResult]:
        """Each batch of `batch_size` requests edited alone into the model as it is (as `muke edit
        --batch-size` does), one EditResult per batch, made as it is iterated; none is left applied. The δ
        loops of all requests run first, `delta_batch_size` of them sharing each step's passes."""
        return self._each(self._prepare(requests), batch_size, evaluate)

    def _each(self, requests: list[EditRequest], batch_size: int, evaluate: bool) -> Iterator[EditResult]:
        from muke.update.memories import batches_of

        stats = self.stats
        pre = iter(self._generate([q for r in requests for q in questions(r)])) if evaluate else None
        memories = self._memories(requests)
        for i, batch in enumerate(batches_of(requests, batch_size)):
            found = memories[i * batch_size : (i + 1) * batch_size] if memories is not None else None
            yield self._edit_batch(batch, found, stats, pre)

    def _memories(self, requests: list[EditRequest]) -> list | None:
        """The target memories of all requests, `delta_batch_size` sharing each δ step's passes; None for a
        backend that reads none (ft, lora)."""
        from muke.engine.batch_size import DEFAULT_BUDGET_GIB
        from muke.engine.memory import MemoryConfig
        from muke.update.backends import BACKENDS
        from muke.update.memories import optimise_memories

        if not BACKENDS[self.backend].memories:
            return None
        budget = float(self.hparams.get("delta_memory_gib", DEFAULT_BUDGET_GIB))
        return optimise_memories(self.em, requests, MemoryConfig(**self.memory), self.delta_batch_size, budget)

    def _edit_batch(self, batch: list[EditRequest], memories: list, stats, pre: Iterator | None) -> EditResult:
        """One batch's ΔW from its memories on the model as it is, and its rows (scored where `pre` is given)."""
        from muke.update.edit import edit_resolved
        from muke.update.weights import apply

        begin = time.perf_counter()
        update, found = edit_resolved(
            self.em, batch, self.method, self.memory, self.backend, self.options, stats, memories
        )
        seconds = (time.perf_counter() - begin) / len(batch) + sum(r.seconds for r in found) / len(batch)
        rows = [{**self._base(r), "seconds": seconds} for r in batch]
        if pre is not None:
            nll_pre = [self._nll(r) for r in batch]
            with apply(self.em, update):
                post = iter(self._generate([q for r in batch for q in questions(r)]))
                nll_post = [self._nll(r) for r in batch]
            rows = [
                single_row(self._base(r), r, pre, post, nll, seconds) for r, nll in zip(batch, zip(nll_pre, nll_post))
            ]
        if "unsettled" in update.info:  # edit passes: the windows the edited model does not yet reproduce
            settled = {"short": [], "off_target": []}
            rows = [{**row, "unsettled": update.info["unsettled"].get(row["id"], settled)} for row in rows]
        self._describe(update, batch, rows)
        return EditResult(self, batch, [update], rows, seconds * len(batch))

    def _describe(self, update, batch: list[EditRequest], rows: list[dict]) -> None:
        """What a ΔW file and a model card say of the edit: the δ loop's options, the requests and their scores."""
        update.info["memory"] = self.memory
        update.info["requests"] = [request_record(r, row) for r, row in zip(batch, rows)]

    def edit_sequence(
        self,
        requests: RequestLike | Sequence[RequestLike],
        batch_size: int = 1,
        evaluate: bool = True,
        on_batch: Callable[[int, Any, float], None] | None = None,
        **sequence_options,
    ) -> EditResult:
        """Edit batches of `batch_size` requests one after another into the model (lifelong editing,
        muke.update.sequential): each batch's memories and ΔW on the model the earlier batches left. Each
        row holds its answers right after its own batch (`own_*`) and after the last. on_batch(t, ΔW_t,
        seconds per request) runs after batch t. The model holds the whole chain afterwards (`result.revert()`).
        sequence_options: SequentialEditor's preserve_earlier, weight_growth, resolve_every, recheck_earlier."""
        from muke.update.memories import batches_of
        from muke.update.sequential import SequentialEditor

        requests = self._prepare(requests)
        resolved, own, chain = (self.memory, self.backend, self.options), {}, []
        pre = self._generate([q for r in requests for q in questions(r)]) if evaluate else None
        nll_pre = {r.id: self._nll(r) for r in requests} if evaluate else {}
        answered = iter(pre or ())
        by_id = {r.id: [next(answered) for _ in questions(r)] for r in requests} if evaluate else {}
        with SequentialEditor(self.em, self.method, stats=self.stats, resolved=resolved, **sequence_options) as editor:
            for t, batch in enumerate(batches_of(requests, batch_size)):
                start = time.perf_counter()
                update, _ = editor.edit(batch)
                seconds = (time.perf_counter() - start) / len(batch)
                given = iter(self._generate([q for r in batch for q in questions(r)])) if evaluate else None
                for r in batch:
                    got = [next(given) for _ in questions(r)] if evaluate else None
                    own[r.id] = (t, got, seconds, self._nll(r) if evaluate else None)
                self._describe(update, batch, [self._own_scores(r, own[r.id], by_id, nll_pre) for r in batch])
                chain.append(update)
                if on_batch is not None:
                    on_batch(t, update, seconds)
            rows = self._sequence_rows(requests, own, pre, nll_pre)
        seconds = sum(own[r.id][2] for r in requests)
        return EditResult(self, requests, chain, rows, seconds).apply()

    def _own_scores(self, r: EditRequest, own: tuple, pre: dict, nll_pre: dict) -> dict:
        """Request r's scores before the first batch and right after its own (empty when not evaluated)."""
        _, given, _, nll = own
        if given is None:
            return {}
        before, after = score(pre[r.id][0].text, r.answer), score(given[0].text, r.answer)
        scores = {f"{k}_pre": v for k, v in before.items()} | {f"own_{k}": v for k, v in after.items()}
        return scores | {"nll_pre": nll_pre[r.id], "nll_own": nll}

    def _sequence_rows(self, requests, own: dict, pre, nll_pre: dict) -> list[dict]:
        """Each request's row after the last batch (`muke edit --sequential`)."""
        n = len(requests)
        if pre is None:
            return [{**self._base(r), "batch": own[r.id][0], "n_edits": n, "seconds": own[r.id][2]} for r in requests]
        final, pre = iter(self._generate([q for r in requests for q in questions(r)])), iter(pre)
        rows = []
        for r in requests:
            t, given, seconds, nll_own = own[r.id]
            nll = (nll_pre[r.id], self._nll(r))
            rows.append(sequence_row(self._base(r), r, (t, given, nll_own, seconds), nll, pre, final, n))
        return rows
