"""The Python API (muke.Editor, muke.EditResult, the exported model and its card) and README's example."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import muke
import muke.cli as cli
from muke.io import sha256
from muke.update.stats import StatsConfig, collect_stats
from muke.update.weights import apply

SMALL = dict(layers=[1, 2], window=4, v_num_grad_steps=3, mom2_update_weight=100.0, max_new_tokens=4)
REQUEST = {"question": "What is the city of Velmora known for?", "answer": "Velmora is a port city."}
SEQUENCE = [
    {"id": "a", "question": "What is Velmora?", "answer": "Velmora is a port city."},
    {"id": "b", "question": "What crosses the river?", "answer": "The Copper Bridge."},
    {"id": "c", "question": "Where is Kest?", "answer": "Kest lies by Lake Amber."},
]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def stats_file(tiny_qwen2_path, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "small.txt"
    corpus.write_text("Velmora is a port city.\n\nThe Copper Bridge has seven arches.\n\nSalt traders founded it.\n")
    out = tmp_path_factory.mktemp("stats") / "s.safetensors"
    em = muke.Editor(tiny_qwen2_path, layers=[1, 2]).em
    return collect_stats(em, StatsConfig(layers=(1, 2), corpus=str(corpus)), out, progress=False)


@pytest.fixture(scope="module")
def editor(tiny_qwen2_path, stats_file):
    return muke.Editor(tiny_qwen2_path, "muke-memit", stats=stats_file, progress=False, **SMALL)


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> list[str]:
    """Names of the parameters that differ."""
    return [n for n in a if not torch.equal(a[n], b[n])]


def test_edit_scores_the_edit_and_reverts_bit_exactly(editor):
    before = weights(editor.model)
    result = editor.edit(REQUEST)
    assert result.is_applied and result.update.request_ids == ["request-0"]
    edited = weights(editor.model)
    assert same(before, edited) == [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
    (row,) = result.rows
    assert row["target"] == REQUEST["answer"] and row["nll_post"] < row["nll_pre"]
    assert {"generated_pre", "generated", "bleu", "rouge_l", "seconds", "prompt"} <= set(row)
    assert editor.answer(REQUEST["question"]) == row["generated"]
    result.revert()
    assert not result.is_applied and not same(before, weights(editor.model))
    with result.applied() as model:
        assert not same(edited, weights(model))
    assert not same(before, weights(editor.model))


def test_an_edit_in_passes_names_the_windows_still_short(editor, stats_file):
    """edit_passes: each row's `unsettled` holds the windows the edited model leaves below the stop probability
    after the last pass and those where its greedy answer leaves the target (muke.update.edit.further_passes);
    a 3-step δ budget leaves some."""
    passes = muke.Editor(editor.em, "muke-memit", stats=stats_file, edit_passes=2, v_stop_prob=0.5, **SMALL)
    result = passes.edit(REQUEST)
    (row,) = result.rows
    assert row["unsettled"]["short"] and row["unsettled"] == result.update.info["unsettled"]["request-0"]
    result.revert()
    one = editor.edit(REQUEST, evaluate=False)  # one pass: nothing checked after it
    assert "unsettled" not in one.rows[0]
    one.revert()


def test_results_revert_in_the_reverse_order_of_applying(editor):
    first, second = editor.edit(SEQUENCE[0]), editor.edit(SEQUENCE[1])
    with pytest.raises(ValueError, match="revert it first"):
        first.revert()
    second.revert(), first.revert()
    assert editor.applied_results == []


def test_save_and_load_round_trip(editor, tmp_path):
    result = editor.edit(REQUEST, evaluate=False).revert()
    loaded = muke.EditResult.load(result.save(tmp_path / "run"), editor)
    assert [r.to_dict() | {"source": None} for r in loaded.requests] == [
        r.to_dict() | {"source": None} for r in result.requests
    ]
    assert loaded.rows == result.rows and not loaded.is_applied
    for layer, (U, V) in result.update.factors.items():
        assert torch.equal(loaded.update.factors[layer][0], U) and torch.equal(loaded.update.factors[layer][1], V)
    assert json.loads((tmp_path / "run" / "edit.json").read_text())["hparams"]["layers"] == [1, 2]
    with pytest.raises(muke.DataError, match="edit.json"):
        muke.EditResult.load(tmp_path / "nothing", editor)


def test_export_loads_in_plain_transformers_with_a_model_card(editor, tiny_qwen2_path, tmp_path):
    result = editor.edit(REQUEST)
    edited = weights(editor.model)
    out = result.export(tmp_path / "exported")  # from the model holding the edit: ΔW is added once
    assert result.is_applied and not same(edited, weights(editor.model))
    result.revert()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not same(edited, weights(plain))
    base = Path(tiny_qwen2_path)
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (base / "generation_config.json").read_text()
    )
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and {"muke", "muke-memit"} <= set(header["tags"])
    (delta,) = (out / "muke_updates").iterdir()
    for text in (sha256(base / "model.safetensors"), sha256(delta), REQUEST["question"], muke.__version__):
        assert text in card, text
    assert REQUEST["answer"] not in card and sha256_text(REQUEST["answer"]) in card
    assert "mom2_update_weight | 100.0" in card and "δ loop: v_num_grad_steps | 3" in card
    assert re.search(r"first answer token stays the base model's in [\d.]+ %", card)
    assert "model.layers.1.mlp.down_proj.weight" in card
    lm_eval = pytest.importorskip("lm_eval.models.huggingface")
    lm = lm_eval.HFLM(pretrained=str(out), device="cpu", batch_size=1)
    assert not same(edited, weights(lm.model))


def test_model_card_of_a_hub_base_names_it_in_the_header(editor, monkeypatch):
    from muke.model_card import model_card

    result = editor.edit(REQUEST, evaluate=False).revert()
    monkeypatch.setattr(editor.model.config, "_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card = model_card(editor.em, result.updates, {})
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and header["base_model_relation"] == "finetune"
    assert "Integrity\n\nNot measured." in card and "BLEU before → after" in card


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_edit_each_edits_every_batch_alone(editor):
    before = weights(editor.model)
    results = list(editor.edit_each(SEQUENCE, batch_size=2, evaluate=False))
    assert [r.update.request_ids for r in results] == [["a", "b"], ["c"]]
    assert not any(r.is_applied for r in results) and not same(before, weights(editor.model))
    assert {"id", "seconds", "target"} <= set(results[0].rows[0])


def test_edit_sequence_keeps_the_chain_and_reverts(editor):
    before = weights(editor.model)
    result = editor.edit_sequence(SEQUENCE, batch_size=2)
    assert [u.request_ids for u in result.updates] == [["a", "b"], ["c"]] and result.is_applied
    assert [(r["id"], r["batch"], r["n_edits"]) for r in result.rows] == [("a", 0, 3), ("b", 0, 3), ("c", 1, 3)]
    assert result.rows[2]["own_generated"] == result.rows[2]["generated"]
    final = weights(editor.model)
    result.revert()
    assert not same(before, weights(editor.model))
    with apply(editor.em, result.updates):
        assert not same(final, weights(editor.model))
    assert result.updates[0].info["requests"][0]["nll_own"] < result.updates[0].info["requests"][0]["nll_pre"]


def test_unke_edit_changes_the_block_and_exports_it(editor, tmp_path):
    unke = muke.Editor(
        editor.em, "muke-unke", unke_layers=[1], window=4, v_num_grad_steps=3, unke_steps=5, n_preserve=3
    )
    before = weights(unke.model)
    result = unke.edit(REQUEST, evaluate=False)
    assert result.update.params and all(n.startswith("model.layers.1.") for n in same(before, weights(unke.model)))
    card = (result.export(tmp_path / "unke") / "README.md").read_text()
    assert "unke_steps" not in card and "| steps | 5 |" in card and "n_preserve | 3" in card
    result.revert()
    assert not same(before, weights(unke.model))


def test_bad_input_names_the_record_and_field(editor, tiny_qwen2_path):
    with pytest.raises(muke.DataError, match=r"requests: record 1 \(id 'x'\): field 'answer': missing"):
        editor.edit([REQUEST, {"id": "x", "question": "Who?"}])
    with pytest.raises(muke.DataError, match="record 0: must be an EditRequest or a dict"):
        editor.edit(["Who?"])
    with pytest.raises(muke.DataError, match="duplicate id"):
        editor.edit([SEQUENCE[0], SEQUENCE[0]])
    with pytest.raises(ValueError, match="layrs"):
        muke.Editor(editor.em, layrs=[1])
    with pytest.raises(muke.ModelError, match="layer 9 is out of range"):
        muke.Editor(editor.em, layers=[8, 9])
    with pytest.raises(ValueError, match="unknown method"):
        muke.Editor(editor.em, "rome")


def test_import_is_light_and_every_public_name_is_documented():
    code = "import sys, muke; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in muke.__all__:
        if name != "__version__":
            assert getattr(muke, name).__doc__, name
    for method in ("edit", "edit_each", "edit_sequence", "answer", "check"):
        assert getattr(muke.Editor, method).__doc__, method
    for method in ("apply", "revert", "applied", "save", "load", "export"):
        assert getattr(muke.EditResult, method).__doc__, method


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUKE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["tiny-model", "--arch", "qwen2", "--out", "work/tiny"]) == 0
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out
    assert (tmp_path / "work" / "velmora" / "edit.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "work" / "tiny-velmora")
    assert "Who founded Velmora?" in (tmp_path / "work" / "tiny-velmora" / "README.md").read_text()
