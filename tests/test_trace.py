"""Causal tracing (muke.locate): restorations against independent runs on a tiny model, the maps, the band."""

from contextlib import ExitStack

import pandas as pd
import pytest
import torch

from muke.cli import main
from muke.engine import hooks
from muke.engine.windows import encode
from muke.locate.maps import check_components, effect_map, suggest_band
from muke.locate.trace import (
    RequestTrace,
    Restoration,
    TraceConfig,
    embedding_std,
    position_groups,
    question_positions,
    trace_request,
    traced_module,
)
from muke.model import load

QUESTION = "Who built the old stone bridge over the river?"
ANSWER = "The bridge was built by the masons of the town in the year of the great flood, and it still stands."


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    return load(tiny_llama_path)


@pytest.fixture(scope="module")
def run(tiny):
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, window=8)
    question = question_positions(tiny.tokenizer, seq, QUESTION)
    return RequestTrace(tiny, seq, question, TraceConfig(samples=2, batch_size=5), embedding_std(tiny))


def oracle(run: RequestTrace, r: Restoration, sample: int) -> torch.Tensor:
    """The straightforward restored run: the whole model on the noisy embeddings of one sample, the clean
    state written back by a hook, log p of the targets from the full logits."""
    em, seq = run.em, run.seq
    mask = torch.zeros(1, run.noisy.shape[1], dtype=torch.bool)
    mask[0, list(r.positions)] = True
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(
            hooks.restores(traced_module(em, r.component, r.layer), run.clean[r.component, r.layer], mask)
        )
        logits = em.model(inputs_embeds=run.noisy[sample : sample + 1], use_cache=False).logits[0]
    logp = logits[seq.target_positions].log_softmax(-1)
    return logp.gather(-1, torch.tensor(seq.target_ids)[:, None])[:, 0]


def test_question_positions_spell_the_question(tiny, run):
    text = tiny.tokenizer.decode([run.seq.prompt_ids[p] for p in question_positions(tiny.tokenizer, run.seq, QUESTION)])
    assert text.strip() == QUESTION
    groups = position_groups(run.seq, question_positions(tiny.tokenizer, run.seq, QUESTION))
    assert groups["last_prompt"] == (len(run.seq.prompt_ids) - 1,)
    assert groups["window_starts"] == tuple(run.seq.hook_positions[1:]) and len(groups["window_starts"]) >= 2
    assert groups["last_question"][0] < groups["last_prompt"][0]


def test_noise_hurts_and_restoring_everything_recovers_the_clean_run(tiny, run):
    everywhere = tuple(range(run.noisy.shape[1]))
    assert (run.corrupted_logprobs - run.clean_logprobs).abs().max() > 1e-3
    restored = run.restored([Restoration("hidden", layer, everywhere) for layer in range(tiny.n_layers)])
    torch.testing.assert_close(restored, run.clean_logprobs.expand_as(restored), atol=1e-5, rtol=1e-5)


def test_restoring_nothing_gives_the_corrupted_run(tiny, run):
    restored = run.restored([Restoration(c, layer, ()) for c in ("hidden", "mlp", "attn") for layer in (0, 2, 3)])
    torch.testing.assert_close(restored, run.corrupted_logprobs.expand_as(restored), atol=1e-5, rtol=1e-5)


def test_batched_restorations_equal_one_at_a_time_and_the_plain_run(tiny, run):
    question = question_positions(tiny.tokenizer, run.seq, QUESTION)
    restorations = [
        Restoration(c, layer, p)
        for c in ("hidden", "mlp", "attn")
        for layer in range(tiny.n_layers)
        for p in (question, question[-1:])
    ]
    batched = run.restored(restorations)
    single = RequestTrace(tiny, run.seq, question, TraceConfig(samples=2, batch_size=1), embedding_std(tiny))
    torch.testing.assert_close(batched, single.restored(restorations), atol=1e-5, rtol=1e-5)
    for k in (0, 7, 13, len(restorations) - 1):
        torch.testing.assert_close(batched[k, 1], oracle(run, restorations[k], 1), atol=1e-4, rtol=1e-4)
    assert (batched - run.corrupted_logprobs).abs().amax(dim=(1, 2)).gt(1e-4).sum() > len(restorations) // 2


def test_effect_map_and_band():
    """Pooled shares; the band ends at the last layer before the question's hidden-state effect drops below half."""
    curve = [1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.55, 0.1]  # the rise at layer 6 comes after the first drop

    def row(i, layer, component="hidden", gain=None):
        gain = curve[layer] if gain is None else gain
        return {
            "id": i,
            "component": component,
            "layer": layer,
            "group": "question",
            "window_logp": -3 + gain * (1 + i),
            "answer_logp": -3.0,
            "clean_window_logp": -3 + (1 + i),
            "clean_answer_logp": -2.0,
            "corrupted_window_logp": -3.0,
            "corrupted_answer_logp": -3.0,
        }

    rows = [row(i, layer) for i in range(2) for layer in range(8)] + [row(0, 3, "mlp", 0.2), row(1, 3, "mlp", 0.5)]
    emap = effect_map(pd.DataFrame(rows))
    mlp = emap[emap["component"] == "mlp"].iloc[0]
    assert mlp["recovered_window"] == pytest.approx((0.2 + 0.5 * 2) / (1 + 2)) and mlp["recovered_answer"] == 0
    band = suggest_band(emap, width=3)
    assert band["layers"] == [2, 3, 4] and band["l_wm"] == 4 and band["curve"][5] == pytest.approx(0.4)
    assert suggest_band(emap, width=3, threshold=0.95)["layers"] == [0]  # layer 1 is already below
    assert suggest_band(emap, width=10, threshold=0.0)["layers"] == list(range(8))
    with pytest.raises(ValueError, match="needs 'hidden'"):
        check_components(["mlp", "attn"])


def test_trace_request_rows(tiny):
    from muke.data import EditRequest

    r = EditRequest("x", QUESTION, ANSWER)
    rows = trace_request(tiny, r, TraceConfig(samples=1, layers=(1, 2), max_target_tokens=12), embedding_std(tiny), 8)
    df = pd.DataFrame(rows)
    assert len(df) == 3 * 2 * 4 and set(df["n_target"]) == {12}
    assert set(df["group"]) == {"question", "last_question", "last_prompt", "window_starts"}


def test_cli_writes_its_files(tiny_llama_path, tmp_path, capsys):
    from muke.data import RESOURCES

    out = tmp_path / "trace"
    code = main(
        [
            "trace",
            "--model",
            str(tiny_llama_path),
            "--requests",
            str(RESOURCES / "demo_edits.jsonl"),
            "--format",
            "jsonl",
            "--limit",
            "2",
            "--samples",
            "1",
            "--max-target-tokens",
            "16",
            "--width",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert "suggested layers" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "effects.parquet",
        "map.parquet",
        "map_hidden.png",
        "map_mlp.png",
        "map_attn.png",
        "band.json",
    }
    effects = pd.read_parquet(out / "effects.parquet")
    assert effects["id"].nunique() == 2 and set(effects["layer"]) == set(range(4))


def test_stage_writes_what_the_report_shows(tiny_llama_path, tmp_path, monkeypatch):
    """trace_layers from its plan spec on the tiny model; the report spec names its folder; the section
    shows the band and the maps."""
    import copy
    import json
    from pathlib import Path

    import yaml

    from muke.eval.layer_trace import layers_section
    from muke.io import write_json
    from muke.workflow.plan import Plan
    from muke.workflow.stages.common import MODEL_REF
    from muke.workflow.stages.trace_layers import trace_layers

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(repo / "resources")
    config = copy.deepcopy(yaml.safe_load((repo / "config" / "tiny.yaml").read_text()))
    config["trace"] = {"enabled": True, "limit": 1, "samples": 1, "layers": [1, 2], "max_target_tokens": 12, "width": 2}
    plan = Plan(config)
    spec = plan.layer_traces["tiny", "demo"]
    assert (
        spec.params["window"] == 32 and spec.params["limit"] == 1 and "batch_size" not in spec.params
    )  # W: tiny preset
    folder = plan.layer_trace_dir("tiny", "demo")
    assert json.loads(plan.report_spec())["layer_traces"] == [{"model": "tiny", "dataset": "demo", "path": folder}]
    assert plan.report_inputs()["layer_traces"] == [folder]
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(tiny_llama_path)})
    trace_layers(json.loads(spec.to_json()), model_dir, config["datasets"]["demo"]["path"], folder, device="cpu")
    band = json.loads((Path(folder) / "band.json").read_text())
    assert band["n_requests"] == 1 and len(band["layers"]) == 2 and (Path(folder) / "manifest.json").is_file()
    html = "".join(layers_section([{"model": "tiny", "dataset": "demo", "path": folder}]))
    assert f"Suggested layers <b>{band['layers']}</b>" in html and html.count("<img alt='map_") == 3


@pytest.mark.slow
def test_workflow_traces_and_reports_the_layers(tmp_path):
    """With trace.enabled the DAG has one trace_layers job per model × dataset, feeding the report; the
    job run by Snakemake writes its folder (about a minute on 2 busy cores)."""
    import copy

    from test_workflow import SNAKEMAKE, TINY, make_workdir, planned, snakemake, snapshot

    if not SNAKEMAKE.exists():
        pytest.skip("snakemake is not installed (extra 'workflow')")
    repo = snapshot(tmp_path / "repo")
    workdir = make_workdir(tmp_path / "work", repo)
    config = copy.deepcopy(TINY)
    config["trace"] = {"enabled": True, "limit": 1, "samples": 1, "max_target_tokens": 8}
    assert planned(workdir, config, repo)["trace_layers"] == 1
    proc = snakemake(workdir, config, "-n", "--forceall", "report", repo=repo)
    assert "rule trace_layers" in proc.stdout + proc.stderr
    snakemake(workdir, config, "--until", "trace_layers", repo=repo)
    (folder,) = (workdir / TINY["results"] / "trace" / "tiny" / "demo").iterdir()
    assert {"band.json", "effects.parquet", "map_hidden.png", "manifest.json"} <= {p.name for p in folder.iterdir()}
