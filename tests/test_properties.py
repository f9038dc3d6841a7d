"""Property-based bad-input tests (hypothesis): generated malformed request files of every format and
generated malformed configs never end in a traceback, only in an error naming the file, record and field
(muke.data.DataError) or the config key (muke.workflow.config.ConfigError)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muke.data import FORMATS, DataError, load_requests_checked
from muke.workflow.config import ConfigError, check_config

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
TRIPLET = {"prompt": "{} is in", "subject": "Velmora", "target": "Norway"}
VALID = {
    "jsonl": {"id": "a", "question": "Q?", "answer": "A.", "sub_questions": ["q"], "sub_answers": ["a"]},
    "unkebench": {"id": "a", "question": "Q?", "answer": "A.", "sub_question": ["q"], "sub_answer": ["a"]},
    "editeverything": {"id": "a", "question": "Q?", "answer": "A.", "category": "c"},
    "akew-counterfact": {
        "case_id": 1,
        "paraphrase_prompts": ["P?"],
        "requested_rewrite": {"prompt_full": "Q?", "fact_new_uns": "A.", "unsfact_triplets_GPT": [TRIPLET]},
    },
    "akew-mquake": {
        "case_id": 1,
        "requested_rewrite": [{"question": "Q?", "fact_new_uns": "A.", "unsfact_triplets_GPT": [TRIPLET]}],
    },
}
EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["", " ", "{}", "{0[x]}", "{0.real}", "{1}", "{", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def paths_of(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value, the value itself included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths_of(child, (*prefix, key))


@st.composite
def mutated(draw, valid):
    """A copy of `valid` with one value replaced, or one key deleted, somewhere inside it."""
    value = copy.deepcopy(valid)
    path = draw(st.sampled_from(list(paths_of(value))))
    if not path:
        return draw(json_values)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return value


def write_records(folder: Path, fmt: str, records: list) -> Path:
    path = folder / ("data.jsonl" if fmt == "jsonl" else "data.json")
    text = "".join(json.dumps(r) + "\n" for r in records) if fmt == "jsonl" else json.dumps(records)
    path.write_text(text)
    return path


def check_errors(path: Path, records: list, requests, errors) -> None:
    """Every record is a request or an error naming the file and the record (and a field where the
    record is an object whose fields are at fault)."""
    assert len(requests) + len(errors) == len(records)
    for e in errors:
        assert isinstance(e, DataError) and str(path) in str(e) and e.record is not None
        assert f"record {e.record}" in str(e)
        if isinstance(records[e.record], dict) and e.field is None:
            pytest.fail(f"no field named: {e}")


@pytest.mark.parametrize("fmt", FORMATS)
@EXAMPLES
@given(data=st.data())
def test_malformed_records_are_named_never_a_traceback(fmt, data):
    records = data.draw(st.lists(st.just(VALID[fmt]) | mutated(VALID[fmt]), min_size=1, max_size=4))
    with tempfile.TemporaryDirectory() as folder:
        path = write_records(Path(folder), fmt, records)
        requests, errors = load_requests_checked(path, fmt, "skip")
        check_errors(path, records, requests, errors)
        if errors:
            with pytest.raises(DataError, match=f"{path}: record {errors[0].record}"):
                load_requests_checked(path, fmt, "error")


@pytest.mark.parametrize("fmt", FORMATS)
@EXAMPLES
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_unreadable_files_are_named_never_a_traceback(fmt, raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.json"
        path.write_bytes(raw)
        try:
            requests, errors = load_requests_checked(path, fmt, "skip")
        except DataError as e:
            assert str(e).startswith(str(path))
            return
        assert all(isinstance(e, DataError) and str(e).startswith(str(path)) for e in errors)


def test_a_number_too_long_for_python_is_named():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text('{"id": ' + "9" * 5000 + ', "question": "Q?", "answer": "A."}\n')
        with pytest.raises(DataError, match=rf"{path}: record 0 \(line 1\): invalid JSON"):
            load_requests_checked(path, "jsonl")


@EXAMPLES
@given(config=mutated(TINY))
def test_malformed_configs_are_refused_naming_the_key(config):
    if not isinstance(config, dict):
        config = {"results": config}
    try:
        check_config(config)
    except ConfigError as e:
        assert all("config key" in line or "config:" in line for line in str(e).splitlines() if line.strip()), e


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=mutated({k: v for k, v in TINY.items() if k != "models"}))
def test_malformed_configs_never_end_the_plan_in_a_traceback(config, monkeypatch):
    """The whole plan (presets, layers, sweeps, data selection): a ConfigError naming the key or a
    DataError naming the file, never another exception."""
    from muke.workflow.plan import Plan

    monkeypatch.chdir(REPO)
    if not isinstance(config, dict):
        config = {"results": config}
    try:
        Plan({**config, "models": TINY["models"], "results": str(Path(tempfile.gettempdir()) / "muke-properties")})
    except ConfigError as e:
        assert "config key" in str(e) or "config:" in str(e), e
    except DataError as e:
        assert e.path in str(e)
