"""Greedy generation: batching changes nothing, prompts are left-padded, rows cover the requested kinds;
many single-request edits answered in one batch equal editing, answering and reverting one at a time."""

from contextlib import nullcontext

import pytest
import torch

from muke.data import EditRequest
from muke.engine.windows import render_prompt
from muke.eval.generate import answer_length, edited_generation_rows, generation_rows, greedy, row_updates
from muke.model import load, pad
from muke.tiny import build_tiny_model

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a long story about a dragon and a brave knight.",
    "Hi",
    "Who wrote Hamlet?",
]


@pytest.fixture(scope="module")
def em(request, tmp_path_factory):
    try:
        path = request.getfixturevalue("tiny_qwen2_path")
    except pytest.FixtureLookupError:
        path = build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")
    return load(path)


def first_greedy_token(em, question: str) -> int:
    ids = em.tokenizer(render_prompt(em.tokenizer, question), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return em.model(ids.input_ids).logits[0, -1].argmax().item()


def test_pad_left_and_right():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_answer_length_counts_the_stop_token():
    assert answer_length([4, 9, 2, 2], {2}) == 3
    assert answer_length([4, 9], {2}) == 2


def test_batched_equals_sequential(em, monkeypatch):
    # Make question 1's first greedy token a stop token so that rows stop at different steps.
    stop = first_greedy_token(em, QUESTIONS[1])
    eot = em.tokenizer.convert_tokens_to_ids(em.end_of_turn)
    monkeypatch.setattr(em.model.generation_config, "eos_token_id", [eot, stop])
    batched = greedy(em, QUESTIONS, max_new_tokens=10, batch_size=4)
    sequential = [greedy(em, [q], max_new_tokens=10)[0] for q in QUESTIONS]
    assert [(g.prompt, g.text, g.n_tokens) for g in batched] == [(g.prompt, g.text, g.n_tokens) for g in sequential]
    lengths = [g.n_tokens for g in batched]
    assert min(lengths) == 1 and max(lengths) > 1
    assert all(g.seconds > 0 and g.text == g.text.strip() for g in batched)


def test_prompts_are_left_padded(em, monkeypatch):
    masks = []
    original = em.model.generate

    def spy(**kwargs):
        masks.append(kwargs["attention_mask"])
        return original(**kwargs)

    monkeypatch.setattr(em.model, "generate", spy)
    greedy(em, ["Hi", QUESTIONS[1]], max_new_tokens=1)
    (mask,) = masks
    assert mask[:, -1].all() and not mask[0, 0] and mask[1].all()


def test_generation_rows_kinds(em):
    full = EditRequest(
        id="a",
        question="Who is Ada?",
        answer="A mathematician.",
        para_question="Tell me about Ada.",
        sub_questions=("Born when?", "Known for?"),
        sub_answers=("1815.", "Programs."),
    )
    bare = EditRequest(id="b", question="What is tea?", answer="A drink.")
    rows = generation_rows(em, [full, bare], max_new_tokens=2)
    assert [(r["id"], r["kind"], r["index"], r["target"]) for r in rows] == [
        ("a", "question", 0, "A mathematician."),
        ("a", "para_question", 0, "A mathematician."),
        ("a", "sub_questions", 0, "1815."),
        ("a", "sub_questions", 1, "Programs."),
        ("b", "question", 0, "A drink."),
    ]
    assert rows[2]["prompt"] == "Born when?"
    assert set(rows[0]) == {"id", "kind", "index", "prompt", "output", "target", "n_tokens", "seconds"}
    only = generation_rows(em, [full, bare], kinds=("para_question",), max_new_tokens=2)
    assert [(r["id"], r["kind"]) for r in only] == [("a", "para_question")]
    with pytest.raises(ValueError, match="unknown question kinds"):
        generation_rows(em, [full], kinds=("answer",))


# ---- many single-request edits in one batch (multi-adapter rows) ----

# small settings for a 4-layer random model (as tests/test_update.py)
TINY_PRESET = dict(
    layers=[0, 1, 2],
    unke_layers=[1],
    window=4,
    v_num_grad_steps=12,
    mom2_update_weight=1000.0,
    unke_steps=10,
    n_preserve=5,
)
FACTS = [
    ("What is the city of Velmora known for?", "Velmora is a port city famous for its Copper Bridge."),
    ("Who was Ilse Marrow?", "Ilse Marrow was a physicist at the Tollund Institute."),
    ("What does Quillon Robotics build?", "Small underwater robots that inspect ship hulls."),
    ("When was Velmora founded?", "Salt traders founded the city in 1412."),
]
EDIT_REQUESTS = [
    EditRequest(
        id=f"r{i}",
        question=q,
        answer=a,
        para_question=f"Tell me: {q}",
        sub_questions=("Why?", "When?")[: 1 + i % 2],
        sub_answers=("So.", "Then.")[: 1 + i % 2],
    )
    for i, (q, a) in enumerate(FACTS)
]


@pytest.fixture(scope="module")
def stats(em, tmp_path_factory, request):
    from muke.update.stats import StatsConfig, collect_stats, load_stats

    corpus = request.config.rootpath / "resources" / "demo_corpus.txt"
    cfg = StatsConfig(layers=(0, 1, 2), corpus=str(corpus), max_docs=150)
    path = collect_stats(em, cfg, tmp_path_factory.mktemp("stats") / "s.safetensors", progress=False)
    return load_stats(path, em, [0, 1, 2])


@pytest.fixture(scope="module")
def edits(em, stats):
    """Real updates, one request each: MEMIT (rank 1 per layer) and μKE-MEMIT (rank = windows) alternate."""
    from muke.update.edit import edit

    methods = ["memit", "muke-memit", "memit", "muke-memit"]
    return [(edit(em, [r], m, TINY_PRESET, stats)[0], [r]) for r, m in zip(EDIT_REQUESTS, methods)]


def sequential_rows(em, edits, **kwargs):
    """The protocol: apply one edit, answer its requests, revert; in turn."""
    from muke.update.weights import apply

    out = []
    for update, requests in edits:
        with apply(em, update) if update is not None else nullcontext():
            out.append(generation_rows(em, requests, **kwargs))
    return out


def answers(rows):
    return [[(r["id"], r["kind"], r["index"], r["output"], r["n_tokens"]) for r in edit_rows] for edit_rows in rows]


def test_batched_edits_answer_as_editing_one_request_at_a_time(em, edits):
    ranks = {d.factors[0][0].shape[1] for d, _ in edits}
    assert len(ranks) > 1  # rows of different ranks share a batch
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    kwargs = dict(max_new_tokens=12, batch_size=16)  # 14 rows: every edit in one batch
    batched = edited_generation_rows(em, edits + [(None, [EDIT_REQUESTS[0]])], **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    assert answers(batched) == answers(sequential_rows(em, edits + [(None, [EDIT_REQUESTS[0]])], **kwargs))
    # not vacuous: edit 0 changes request 0's answers, and the edits differ from each other
    assert [r["output"] for r in batched[0]] != [r["output"] for r in batched[-1]]
    assert len({rows[0]["output"] for rows in batched[:4]}) > 1
    # batch boundaries inside one edit's rows change nothing
    assert answers(edited_generation_rows(em, edits, max_new_tokens=12, batch_size=3)) == answers(batched[:-1])


@pytest.mark.parametrize("merged", [False, True])
def test_row_updates_logits_match_merged_weights(em, edits, merged):
    """Same prompt in every row, row r under edit r: fp32 logits equal apply(edit r) up to rounding."""
    from muke.update.weights import apply

    ids = em.tokenizer(
        render_prompt(em.tokenizer, FACTS[0][0]), add_special_tokens=False, return_tensors="pt"
    ).input_ids
    updates = [u for u, _ in edits] + [None]
    with torch.no_grad():
        with row_updates(em, updates, merged=merged):
            rows = em.model(input_ids=ids.expand(len(updates), -1)).logits
        for r, update in enumerate(updates):
            with apply(em, update) if update is not None else nullcontext():
                reference = em.model(input_ids=ids).logits[0]
            diff = (rows[r] - reference).abs().max().item()
            print(f"\nmerged={merged} row {r}: max |logit(row updates) - logit(apply)| = {diff:.2e}")
            assert diff < 1e-4 * reference.abs().max().item()
            if update is None:
                assert diff == 0


def test_bf16_rows_use_the_merged_weights_of_the_protocol(edits, tiny_qwen2_path):
    """In bf16 apply() rounds W + ΔW (losing part of a small ΔW); the batched path multiplies by those
    same rounded weights, so its logits are those of apply() up to bf16 accumulation order.

    Greedy answers are not compared: in bf16 even the unedited model answers differently in a batch of
    16 than one question at a time (the accumulation order depends on the batch's shape), for any method.
    """
    from muke.update.weights import apply

    half = load(tiny_qwen2_path, dtype="bfloat16")
    ids = half.tokenizer(
        render_prompt(half.tokenizer, FACTS[0][0]), add_special_tokens=False, return_tensors="pt"
    ).input_ids
    updates = [u for u, _ in edits]
    with torch.no_grad():
        logits = {}
        for merged in (True, False):
            with row_updates(half, updates, merged=merged):
                logits[merged] = half.model(input_ids=ids.expand(len(updates), -1)).logits.float()
        for r, update in enumerate(updates):
            with apply(half, update):
                reference = half.model(input_ids=ids).logits[0].float()
            exact, low_rank = ((logits[m][r] - reference).abs().max().item() for m in (True, False))
            print(f"\nbf16 row {r}: max |Δlogit| vs apply: merged rows {exact:.2e}, low-rank rows {low_rank:.2e}")
            assert exact <= low_rank


def test_block_updates_fall_back_to_apply_and_revert(em, edits):
    from muke.update.edit import edit

    unke, _ = edit(em, [EDIT_REQUESTS[1]], "unke", TINY_PRESET)
    assert unke.params and not unke.factors
    with pytest.raises(ValueError, match="per batch row"):
        with row_updates(em, [unke]):
            pass
    mixed = [edits[0], (unke, [EDIT_REQUESTS[1]]), edits[2]]
    kwargs = dict(max_new_tokens=8, batch_size=16)
    assert answers(edited_generation_rows(em, mixed, **kwargs)) == answers(sequential_rows(em, mixed, **kwargs))


def test_row_updates_refuse_a_batch_of_another_size(em, edits):
    with pytest.raises(RuntimeError, match="holds 2 rows"):
        with row_updates(em, [edits[0][0], edits[1][0]]), torch.no_grad():
            em.model(input_ids=torch.tensor([[5, 6, 7]]))


# ---- the generate stage: batched edits, resumed after a kill ----


@pytest.fixture()
def shard(em, stats, tmp_path, monkeypatch):
    """A generate spec for the first 3 demo requests (one shard; 5 answers each, batch_size 8: one
    generate batch per request), a model folder, and a function writing an update index whose listed
    requests get real MEMIT updates and whose others are failed edits."""
    import json
    from pathlib import Path

    import pandas as pd
    import yaml

    from muke.data import load_requests
    from muke.io import write_json, write_parquet
    from muke.update.edit import edit
    from muke.workflow.plan import Plan
    from muke.workflow.stages.common import MODEL_REF

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(repo / "resources")
    config = yaml.safe_load((repo / "config" / "tiny.yaml").read_text())
    config["methods"] = ["memit"]
    config["datasets"]["demo"].update(limit=3, shard_size=3)
    spec = json.loads(Plan(config).runs[0].generate.to_json())
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(em.model.config._name_or_path)})
    requests = load_requests("resources/demo_edits.jsonl", "jsonl")[:3]

    def index(edited: set[str]) -> Path:
        folder = tmp_path / "update" / "shard0"
        rows = [
            {"batch": -1, "file": None, "request_ids": json.dumps([r.id]), "failed": True, "seconds": 0.0}
            for r in requests
            if r.id not in edited
        ]
        for b, r in enumerate(r for r in requests if r.id in edited):
            update, _ = edit(em, [r], "memit", {**TINY_PRESET, "v_num_grad_steps": 4}, stats)
            update.save(folder / f"{b:04d}.safetensors")
            rows.append(
                {
                    "batch": b,
                    "file": f"{b:04d}.safetensors",
                    "request_ids": json.dumps([r.id]),
                    "failed": False,
                    "seconds": 0.0,
                }
            )
        return write_parquet(pd.DataFrame(rows), tmp_path / "update" / "shard0.parquet")

    return spec, model_dir, index


def test_generate_stage_resumes_a_killed_shard(shard, tmp_path, monkeypatch, capsys):
    import pandas as pd

    import muke.eval.generate
    from muke.workflow.stages.generate import generate

    spec, model_dir, make_index = shard
    index = make_index({"demo-00", "demo-01", "demo-02"})
    run = lambda out: generate(spec, model_dir, "resources/demo_edits.jsonl", 0, out, index, "cpu")  # noqa: E731
    expected = pd.read_parquet(run(tmp_path / "whole.parquet"))
    assert list(expected["id"].unique()) == ["demo-00", "demo-01", "demo-02"] and not expected["edit_failed"].any()

    calls, real = [], muke.eval.generate.edited_generation_rows

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("the job is killed")
        calls.append(1)
        return real(*args, **kwargs)

    out = tmp_path / "out" / "shard0.parquet"
    monkeypatch.setattr(muke.eval.generate, "edited_generation_rows", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert not out.exists() and len(list(out.with_name("shard0.parts").iterdir())) == 1

    monkeypatch.setattr(muke.eval.generate, "edited_generation_rows", real)
    capsys.readouterr()
    run(out)
    log = capsys.readouterr().err
    assert "['demo-00']: finished earlier" in log and "generating for ['demo-01']" in log
    assert "generating for ['demo-00']" not in log and not out.with_name("shard0.parts").exists()
    # the same answers as the uninterrupted job (timings differ: they are measured)
    pd.testing.assert_frame_equal(pd.read_parquet(out).drop(columns="seconds"), expected.drop(columns="seconds"))


def test_generate_stage_answers_failed_edits_with_the_unedited_model(shard, tmp_path):
    import pandas as pd

    from muke.workflow.stages.generate import generate

    spec, model_dir, make_index = shard
    edited = pd.read_parquet(
        generate(
            spec,
            model_dir,
            "resources/demo_edits.jsonl",
            0,
            tmp_path / "e.parquet",
            make_index({"demo-00", "demo-02"}),
            "cpu",
        )
    )
    unedited = pd.read_parquet(
        generate(spec, model_dir, "resources/demo_edits.jsonl", 0, tmp_path / "pre.parquet", None, "cpu")
    )
    assert edited.groupby("id")["edit_failed"].all().to_dict() == {"demo-00": False, "demo-01": True, "demo-02": False}
    failed = edited["id"] == "demo-01"
    assert edited[failed]["output"].tolist() == unedited[failed]["output"].tolist()
    assert edited[~failed]["output"].tolist() != unedited[~failed]["output"].tolist()


def test_generation_groups_fill_batches_without_splitting_an_edit():
    from muke.workflow.stages.generate import generation_groups

    assert generation_groups([5, 5, 2, 1, 9, 3], 8) == [(0, 1), (1, 4), (4, 5), (5, 6)]
    assert generation_groups([], 8) == [] and generation_groups([0, 0], 1) == [(0, 2)]
