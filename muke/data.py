"""Edit requests and loaders for UnKEBench, AKEW (CounterFact, MQuAKE-CF), EditEverything and plain JSONL.

Every loader validates what it reads; a `DataError` names the file, the record (index and id when
known) and the field, in the source file's own terms (e.g. `requested_rewrite[0].fact_new_uns`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

FORMATS = ("unkebench", "akew-counterfact", "akew-mquake", "editeverything", "jsonl")
RESOURCES = Path(__file__).resolve().parent.parent / "resources"  # the project's own small files
DEMO_CORPUS = RESOURCES / "demo_corpus.txt"  # statistics corpus of the demo and of tiny models
DEFAULT_PRESERVATION = RESOURCES / "preservation.jsonl"  # UnKE's preservation samples unless a config names others
N_SUB_TRIPLETS = 5  # AKEW: sub-questions come from the first 5 unsfact_triplets_GPT (authors' code)


@dataclass(frozen=True)
class EditRequest:
    """One long-form edit: the question, the target answer and the optional evaluation questions."""

    id: str
    question: str
    answer: str
    para_question: str | None = None
    sub_questions: tuple[str, ...] = ()
    sub_answers: tuple[str, ...] = ()
    category: str | None = None
    source: str | None = None  # "file:index", for messages

    def to_dict(self) -> dict:
        """JSON-ready dict; its keys are those the `jsonl` format reads."""
        d = asdict(self)
        d["sub_questions"], d["sub_answers"] = list(self.sub_questions), list(self.sub_answers)
        return d

    @property
    def record(self) -> int | None:
        """0-based index of the record in its file (from `source`)."""
        return int(self.source.rsplit(":", 1)[1]) if self.source else None


class DataError(ValueError):
    """A problem in an input file, located by file, record (0-based index, id, line) and field."""

    def __init__(self, path, message, record=None, id=None, field=None, line=None):
        self.path, self.record, self.id, self.field, self.line = str(path), record, id, field, line
        self.reason = message
        where = [self.path]
        if record is not None:
            rec = f"record {record}"
            if line is not None:
                rec += f" (line {line})"
            if id is not None:
                rec += f" (id {id!r})"
            where.append(rec)
        elif line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where + [message]))

    def to_dict(self) -> dict:
        """{record, line, id, field, reason, message}: one row of a skipped-records table."""
        return {**{k: getattr(self, k) for k in ("record", "line", "id", "field", "reason")}, "message": str(self)}


class _Fail(Exception):
    """Raised by the field helpers; turned into a DataError by the record loop."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field, self.message = field, message


# ---------------------------------------------------------------------------- field helpers


def _get(obj, key, field):
    if not isinstance(obj, dict):
        raise _Fail(field.rsplit(".", 1)[0] if "." in field else None, "must be a JSON object")
    if key not in obj or obj[key] is None:
        raise _Fail(field, "missing")
    return obj[key]


def _text(obj, key, field=None, optional=False):
    """A non-empty string, or None when optional and absent/null."""
    field = field or key
    if optional and (not isinstance(obj, dict) or obj.get(key) is None):
        return None
    v = _get(obj, key, field)
    if not isinstance(v, str) or not v.strip():
        raise _Fail(field, "must be a non-empty string")
    return v


def _texts(obj, key, field=None):
    """A list of non-empty strings (absent/null -> empty)."""
    field = field or key
    v = obj.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _Fail(field, "must be a list of strings")
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s.strip():
            raise _Fail(f"{field}[{i}]", "must be a non-empty string")
    return tuple(v)


def _id(obj, key):
    v = _get(obj, key, key)
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        raise _Fail(key, "must be a non-empty string or an integer")
    return str(v)


def _subs(obj, qkey, akey):
    """Sub-questions and sub-answers: two lists of equal length."""
    qs, ans = _texts(obj, qkey), _texts(obj, akey)
    if len(qs) != len(ans):
        raise _Fail(akey, f"has {len(ans)} entries but {qkey!r} has {len(qs)}")
    return qs, ans


def _triplets(rw, prefix):
    """AKEW: first 5 unsfact_triplets_GPT -> (prompt.format(subject), target)."""
    field = f"{prefix}.unsfact_triplets_GPT"
    trips = _get(rw, "unsfact_triplets_GPT", field)
    if not isinstance(trips, list):
        raise _Fail(field, "must be a list")
    qs, ans = [], []
    for i, t in enumerate(trips[:N_SUB_TRIPLETS]):
        f = f"{field}[{i}]"
        prompt, subject = _text(t, "prompt", f + ".prompt"), _text(t, "subject", f + ".subject")
        try:
            qs.append(prompt.format(subject))
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as e:  # e.g. '{0[x]}', '{0.y}'
            raise _Fail(f + ".prompt", f"is not a '{{}}' template ({e!r})") from None
        ans.append(_text(t, "target", f + ".target"))
    return tuple(qs), tuple(ans)


# ---------------------------------------------------------------------------- formats


def _long_form(r, sub_keys: tuple[str, str]):
    """The fields of UnKEBench and of plain JSONL records, which differ only in the sub-question keys."""
    qs, ans = _subs(r, *sub_keys)
    return dict(
        id=_id(r, "id"),
        question=_text(r, "question"),
        answer=_text(r, "answer"),
        para_question=_text(r, "para_question", optional=True),
        sub_questions=qs,
        sub_answers=ans,
        category=_text(r, "category", optional=True),
    )


def _unkebench(r):
    return _long_form(r, ("sub_question", "sub_answer"))


def _akew_counterfact(r):
    rw = _get(r, "requested_rewrite", "requested_rewrite")
    if not isinstance(rw, dict):
        raise _Fail("requested_rewrite", "must be a JSON object (a list means format 'akew-mquake')")
    paras = _get(r, "paraphrase_prompts", "paraphrase_prompts")
    para = paras[0] if isinstance(paras, list) and paras else None
    if not isinstance(para, str) or not para.strip():
        raise _Fail("paraphrase_prompts[0]", "must be a non-empty string")
    qs, ans = _triplets(rw, "requested_rewrite")
    return dict(
        id=_id(r, "case_id"),
        question=_text(rw, "prompt_full", "requested_rewrite.prompt_full"),
        answer=_text(rw, "fact_new_uns", "requested_rewrite.fact_new_uns"),
        para_question=para,
        sub_questions=qs,
        sub_answers=ans,
    )


def _akew_mquake(r):
    rws = _get(r, "requested_rewrite", "requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise _Fail("requested_rewrite", "must be a non-empty list (an object means format 'akew-counterfact')")
    rw, p = rws[0], "requested_rewrite[0]"
    if not isinstance(rw, dict):
        raise _Fail(p, "must be a JSON object")
    qs, ans = _triplets(rw, p)
    return dict(
        id=_id(r, "case_id"),
        question=_text(rw, "question", p + ".question"),
        answer=_text(rw, "fact_new_uns", p + ".fact_new_uns"),
        sub_questions=qs,
        sub_answers=ans,
    )


def _editeverything(r):
    return dict(
        id=_id(r, "id"), question=_text(r, "question"), answer=_text(r, "answer"), category=_text(r, "category")
    )


def _jsonl(r):
    return _long_form(r, ("sub_questions", "sub_answers"))


_CONVERT = {
    "unkebench": _unkebench,
    "akew-counterfact": _akew_counterfact,
    "akew-mquake": _akew_mquake,
    "editeverything": _editeverything,
    "jsonl": _jsonl,
}
_ID_KEY = {"akew-counterfact": "case_id", "akew-mquake": "case_id"}


# ---------------------------------------------------------------------------- reading


def _json_problem(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    return f"invalid JSON: {e}"


def jsonl_records(path: Path, text_fields: tuple[str, ...]) -> list[dict]:
    """The records of a JSONL file of objects whose `text_fields` are strings; the first bad line raises a
    DataError naming the line (and field). Used for the statistics corpus and the preservation set."""
    records = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or a number too long for Python's int
            raise DataError(path, _json_problem(e), line=line_no) from None
        for key in text_fields:
            if not isinstance(rec.get(key) if isinstance(rec, dict) else None, str):
                raise DataError(path, "must be a string", line=line_no, field=key)
        records.append(rec)
    return records


def _raw_records(path: Path, fmt: str):
    """Yield (index, line, raw record or DataError); JSONL reports each unreadable line, JSON fails whole."""
    data = path.read_bytes()
    if fmt == "jsonl":
        index = 0
        for line_no, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield index, line_no, json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                yield index, line_no, DataError(path, f"not UTF-8 (byte {e.start} of the line)", index, line=line_no)
            except ValueError as e:  # JSONDecodeError, or a number too long for Python's int
                yield index, line_no, DataError(path, _json_problem(e), index, line=line_no)
            index += 1
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8 (byte offset {e.start})", line=line) from None
    try:
        raw = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or a number too long for Python's int
        raise DataError(path, _json_problem(e), line=getattr(e, "lineno", None)) from None
    if not isinstance(raw, list):
        raise DataError(path, f"format {fmt!r} expects a JSON list of records, got {type(raw).__name__}")
    for index, rec in enumerate(raw):
        yield index, None, rec


def load_requests_checked(path, fmt: str, on_bad_record: str = "error") -> tuple[list[EditRequest], list[DataError]]:
    """Load and validate; with on_bad_record="skip" return (good requests, errors of skipped records)."""
    if fmt not in _CONVERT:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path = Path(path)
    convert, id_key = _CONVERT[fmt], _ID_KEY.get(fmt, "id")
    requests, bad, seen = [], [], {}

    def reject(err):
        if on_bad_record == "error":
            raise err
        bad.append(err)

    for index, line, raw in _raw_records(path, fmt):
        if isinstance(raw, DataError):
            reject(raw)
            continue
        if not isinstance(raw, dict):
            reject(DataError(path, "must be a JSON object", record=index, line=line))
            continue
        rid = raw.get(id_key)
        rid = str(rid) if isinstance(rid, (str, int)) else None
        try:
            fields = convert(raw)
        except _Fail as f:
            reject(DataError(path, f.message, record=index, id=rid, field=f.field, line=line))
            continue
        if fields["id"] in seen:
            reject(
                DataError(
                    path,
                    f"duplicate id (first used by record {seen[fields['id']]})",
                    record=index,
                    id=rid,
                    field=id_key,
                    line=line,
                )
            )
            continue
        seen[fields["id"]] = index
        requests.append(EditRequest(**fields, source=f"{path.name}:{index}"))
    return requests, bad


def load_requests(path, fmt: str) -> list[EditRequest]:
    """Load and validate edit requests; the first problem raises a DataError."""
    return load_requests_checked(path, fmt, "error")[0]


def select(items: Sequence, id_of=lambda r: r.id, ids=None, offset: int = 0, limit: int | None = None) -> list:
    """The chosen part of a file's usable requests, in file order: those whose id is in `ids` (all when
    None), then without the first `offset`, then the first `limit` (all when None). `id_of` reads an item's
    id (EditRequest.id by default). An id of `ids` that is not among the items raises a ValueError naming it."""
    if ids is not None:
        wanted = {str(i) for i in ids}
        missing = wanted - {id_of(r) for r in items}
        if missing:
            raise ValueError(f"no usable request with id {', '.join(sorted(missing))}")
        items = [r for r in items if id_of(r) in wanted]
    items = list(items[offset or 0 :])
    return items[:limit] if limit else items


# ---------------------------------------------------------------------------- checks against a model


def model_problems(
    requests, tokenizer, context_length: int, path, system_prompt: str | None = None, chat_template: bool = True
) -> list[DataError]:
    """What a model's tokenizer and context make of each request, before any model work: a question
    (or paraphrase, sub-question) that templates to no tokens, and an edit sequence (templated question
    + answer + end-of-turn) longer than the model's context. One DataError per problem."""
    from muke.engine.windows import render_prompt

    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    problems = []
    for r in requests:

        def fail(field, message, r=r):
            problems.append(DataError(path, message, record=r.record, id=r.id, field=field))

        questions = [("question", r.question), ("para_question", r.para_question)]
        questions += [(f"sub_questions[{i}]", q) for i, q in enumerate(r.sub_questions)]
        prompt_tokens = {}
        for field, question in questions:
            if question is not None:
                prompt_tokens[field] = n_tokens(render_prompt(tokenizer, question, system_prompt, chat_template))
                if not prompt_tokens[field]:
                    fail(field, "templates to no tokens")
        n = prompt_tokens["question"] + n_tokens(r.answer + (tokenizer.eos_token or "")) - 1
        if n > context_length:
            fail(
                "answer",
                f"question + answer are {n} tokens, longer than the model's context of {context_length} tokens",
            )
    return problems
