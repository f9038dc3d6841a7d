"""muke.workflow.estimate: the per-job memory figures against measured peaks, and the plan's table.

Measured peak: ru_maxrss of a child process (os.wait4: that child's own peak resident set, which
includes every tensor torch allocated on the CPU, whichever allocator path it took), minus the peak of a
child that imports the same modules and loads nothing. tracemalloc does not see torch's allocations,
and torch keeps no CPU allocation statistics, so the resident set of a fresh process is the robust
figure. The model is wide enough (d_ff 4096: C is 64 MiB a layer) that tensors dominate the runtime's
own noise.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from muke.update.backends import BACKENDS
from muke.workflow.footprint import (
    RUNTIME_BYTES,
    UPDATE_COSTS,
    Edit,
    GiB,
    collect_stats_cost,
    generate_cost,
    head_copy,
    memories_cost,
    resident_weights,
    update_cost,
)
from muke.workflow.job_costs import Lengths, job_costs, job_memory, request_lengths
from muke.workflow.widths import KNOWN_WIDTHS, Widths

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2
LAYERS = [1, 2]
BATCH_TOKENS = 1024


def peak_rss(code: str) -> int:
    """Peak resident bytes of a fresh Python process running `code` (one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A random qwen2 model with a wide MLP (hidden 256, d_ff 4096, 3 layers) and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from muke.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("wide") / "model"
    tok = train_tokenizer(ROOT / "resources" / "demo_corpus.txt")
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=4096,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


IMPORTS = """
    import torch
    torch.set_num_threads(1)
    from muke.model import load
    from muke.update.stats import StatsConfig, collect_stats, load_stats
    from muke.update.edit import compute_update
    from muke.update.keys import Target
    from muke.engine.windows import encode
"""


@pytest.fixture(scope="module")
def measured(wide_model, tmp_path_factory):
    """Peak bytes above the import-only baseline of: collecting statistics, a MEMIT update."""
    stats = tmp_path_factory.mktemp("stats") / "s.safetensors"
    corpus = ROOT / "resources" / "demo_corpus.txt"
    base = peak_rss(IMPORTS + "    em = None\n")
    collect = peak_rss(
        IMPORTS
        + f"""
    em = load({str(wide_model)!r})
    cfg = StatsConfig(layers={tuple(LAYERS)}, corpus={str(corpus)!r}, max_docs=32, batch_tokens={BATCH_TOKENS},
                      checkpoint_every=8, tokenize_chunk=8)
    collect_stats(em, cfg, {str(stats)!r}, progress=False)
    """
    )
    update = peak_rss(
        IMPORTS
        + f"""
    em = load({str(wide_model)!r})
    stats = load_stats({str(stats)!r}, em, {LAYERS})
    seq = encode(em.tokenizer, "Where is Velmora?", "Velmora is a port city famous for its Copper Bridge.",
                 em.end_of_turn, window=4)
    z = torch.randn(seq.n_windows, em.hidden_size)
    compute_update(em, [Target("r", seq, z)], "memit", {LAYERS}, stats=stats, mom2_update_weight=1000.0)
    """
    )
    return {"collect_stats": collect - base, "memit": update - base, "base": base}


def wide_widths(path) -> Widths:
    import json

    return Widths.from_config(json.loads((Path(path) / "config.json").read_text()))


@pytest.mark.slow  # three fresh interpreters: ~35 s of CPU
def test_collect_stats_estimate_matches_the_measured_peak(wide_model, measured):
    w = wide_widths(wide_model)
    cost = collect_stats_cost(w, "float32", LAYERS, BATCH_TOKENS, 0)
    estimate = cost.cpu - RUNTIME_BYTES
    assert abs(estimate - measured["collect_stats"]) <= 0.25 * measured["collect_stats"], (
        estimate / MiB,
        measured["collect_stats"] / MiB,
    )


@pytest.mark.slow
def test_memit_update_estimate_matches_the_measured_peak(wide_model, measured):
    w = wide_widths(wide_model)
    cost = update_cost(w, "float32", "memit", LAYERS, 64, 0, 0)
    estimate = cost.cpu - RUNTIME_BYTES
    assert abs(estimate - measured["memit"]) <= 0.25 * measured["memit"], (estimate / MiB, measured["memit"] / MiB)


def test_widths_count_the_parameters_transformers_builds(wide_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide_model)
    assert wide_widths(wide_model).params() == sum(p.numel() for p in model.parameters())


def test_qwen_7b_figures_of_the_issue():
    """Qwen2.5-7B: 7.6 B parameters (30.5 GB fp32), C = 18944² fp32 = 1.43 GB."""
    w = Widths.from_config(KNOWN_WIDTHS["Qwen/Qwen2.5-7B-Instruct"])
    assert abs(w.params() * 4 / 1e9 - 30.5) < 0.2
    assert abs(w.d_ff**2 * 4 / 1e9 - 1.435) < 0.01
    memit = update_cost(w, "float32", "memit", [4, 5, 6, 7, 8], 400, 0, 0)
    assert memit.device < 40e9  # fp32 weights and one streamed layer fit a 40 GB card


def test_every_backend_has_an_update_estimate():
    assert set(UPDATE_COSTS) == set(BACKENDS)


def test_estimate_command_lists_every_stage_of_the_tiny_workflow(capsys, monkeypatch):
    from muke.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["estimate", "--configfile", "config/tiny.yaml", "--gpu-gib", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    jobs = {line.split()[1]: int(line.split()[2]) for line in out[2:-1]}
    # 2 methods + the unedited model; 1 shard; one statistics job; locality of the unedited and 2 edited models
    assert jobs == {"collect_stats": 1, "optimize_memories": 2, "update_weights": 2, "generate": 3, "locality": 3}
    assert all(line.endswith("yes") for line in out[2:-1])


def test_job_memory_gives_each_job_of_the_tiny_plan_once(monkeypatch):
    """One entry per stage spec (the report matches it to the benchmark files whose path names its
    identity). A CPU job's figure need not exceed a GPU job's host figure: the host of a GPU run reads the
    whole checkpoint while moving it to the device, a CPU job only the weights it computes with."""
    from muke.workflow.config import load_yaml
    from muke.workflow.plan import Plan

    monkeypatch.chdir(ROOT)
    plan = Plan(load_yaml("config/tiny.yaml"), basedir=ROOT)
    jobs = job_memory(plan)
    specs = [spec for run in plan.runs for spec in run.specs().values()] + list(plan.pre_edit_locality.values())
    assert len(jobs) == 11  # 1 collect_stats, 2 optimize_memories, 2 update_weights, 3 generate, 3 locality
    assert {(j["rule"], j["identity"]) for j in jobs} == {(s.stage, s.identity) for s in specs if s.stage != "score"}
    assert all(RUNTIME_BYTES < min(j["host_bytes"], j["cpu_bytes"]) and j["device_bytes"] > 0 for j in jobs)


# The rehearsal (docs/REHEARSAL.md): Qwen2.5-7B's widths with 3 decoder layers, bf16 on a CPU, one request
# of 20 prompt and 152 answer tokens. Each job's true peak in GiB: ru_maxrss of the job rerun alone
# (`benchmarks/rehearsal.py peak`); AlphaEdit's update (50 minutes) as Snakemake measured it in the run.
REHEARSAL_PEAKS = {
    "collect_stats": 8.52,
    "optimize_memories matryoshka": 3.86,
    "optimize_memories one_for_all": 3.07,
    "update_weights memit": 8.82,
    "update_weights alphaedit": 11.45,
    "update_weights unke": 6.28,
    "generate memit": 4.12,
    "generate unke": 5.18,
}


def rehearsal_costs() -> dict:
    w = Widths.from_config({**KNOWN_WIDTHS["Qwen/Qwen2.5-7B-Instruct"], "num_hidden_layers": 3})
    bf16, prompt, answer = "bfloat16", 20, 152
    keys = prompt + answer
    return {
        "collect_stats": collect_stats_cost(w, bf16, [1, 2], 1024, 0),
        "optimize_memories matryoshka": memories_cost(w, bf16, 2, prompt, answer, 16, 2, sliced_head=True),
        "optimize_memories one_for_all": memories_cost(w, bf16, 2, prompt, answer, answer, 2, sliced_head=False),
        "update_weights memit": update_cost(w, bf16, "memit", [1, 2], keys, 0, 0),
        "update_weights alphaedit": update_cost(w, bf16, "alphaedit", [1, 2], keys, 0, 0),
        "update_weights unke": update_cost(w, bf16, "unke", [1], keys, 2, 2),
        "generate memit": generate_cost(w, bf16, 1, prompt, 4, 1, Edit(low_rank_layers=2)),
        "generate unke": generate_cost(w, bf16, 1, prompt, 4, 1, Edit(dense_blocks=1)),
    }


def test_edit_passes_add_the_delta_loops_and_updates_of_the_further_passes(monkeypatch):
    from muke.workflow.config import load_yaml
    from muke.workflow.plan import Plan

    monkeypatch.chdir(ROOT)

    def costs(**hparams):
        config = load_yaml("config/tiny.yaml")
        config["hparams"] = hparams
        plan = Plan(config, basedir=ROOT)
        found = {stage: cost for _, stage, spec, cost, _ in job_costs(plan, lambda run: Lengths(40, 60, 40), 700)}
        return found["optimize_memories"], found["update_weights"]

    delta, one = costs()
    _, three = costs(edit_passes=3)
    assert three.flops == pytest.approx(3 * one.flops + 2 * delta.flops)
    assert three.cpu == max(one.cpu, delta.cpu) and three.traffic > one.traffic


def test_cpu_figures_at_qwen_widths_are_within_a_quarter_of_the_rehearsals_peaks():
    costs = rehearsal_costs()
    ratios = {job: costs[job].cpu / GiB / peak for job, peak in REHEARSAL_PEAKS.items()}
    assert all(0.75 <= r <= 1.25 for r in ratios.values()), ratios


def test_a_cpu_job_holds_only_the_weights_it_reads():
    """The checkpoint is memory-mapped: statistics and updates stop at the last edited layer and compute
    no logits; a checkpoint converted to another dtype while loading is resident whole."""
    w = Widths.from_config(KNOWN_WIDTHS["Qwen/Qwen2.5-7B-Instruct"])
    block = w.block_params() * 2
    assert resident_weights(w, "bfloat16", 3, False) == 3 * block
    assert resident_weights(w, "bfloat16", 3, True) == 3 * block + (w.vocab + 1) * w.hidden * 2
    assert resident_weights(w, "bfloat16", 3, True, mapped=False) == w.params() * 2
    mapped = collect_stats_cost(w, "bfloat16", [4, 5], 1024, 0)
    converted = collect_stats_cost(w, "bfloat16", [4, 5], 1024, 0, mapped=False)
    assert converted.cpu - mapped.cpu == w.params() * 2 - 6 * block
    assert mapped.device == converted.device  # a GPU holds the whole model either way


def test_the_head_is_copied_only_in_bf16():
    w = Widths.from_config(KNOWN_WIDTHS["Qwen/Qwen2.5-7B-Instruct"])
    assert head_copy(w, "bfloat16") == w.vocab * w.hidden * 2
    assert head_copy(w, "float16") == head_copy(w, "float32") == 0
    plain = generate_cost(w, "float32", 1, 20, 4, 1)
    assert plain.cpu - plain.device == RUNTIME_BYTES - w.vocab * w.hidden * 4  # fp32: no copy, embedding not read


def test_generate_holds_what_the_answered_edit_changes():
    """A UnKE edit: its fp32 block differences and the block's clone; MEMIT in bf16: a merged down-projection
    per layer and edit of the batch."""
    w = Widths.from_config(KNOWN_WIDTHS["Qwen/Qwen2.5-7B-Instruct"])
    base = generate_cost(w, "bfloat16", 8, 64, 32, 8)
    unke = generate_cost(w, "bfloat16", 8, 64, 32, 8, Edit(dense_blocks=1))
    memit = generate_cost(w, "bfloat16", 8, 64, 32, 8, Edit(low_rank_layers=5, updates=8))
    assert unke.cpu - base.cpu == w.block_params() * (4 + 2)
    merged, building = 8 * 5 * w.hidden * w.d_ff * 2, w.hidden * w.d_ff * (4 + 2)  # + U Vᵀ in fp32, its cast
    assert merged <= memit.device - base.device <= merged + building


def test_request_lengths_are_the_runs_longest_as_its_stages_encode_them(wide_model, tmp_path, monkeypatch):
    import json

    from transformers import AutoTokenizer

    from muke.data import load_requests_checked
    from muke.engine.windows import encode
    from muke.workflow.config import load_yaml
    from muke.workflow.plan import Plan

    monkeypatch.chdir(ROOT)
    plan = Plan(load_yaml("config/tiny.yaml"), basedir=ROOT)
    run = next(r for r in plan.runs if r.memories is not None)
    folder = tmp_path / "prepared"
    folder.mkdir()
    monkeypatch.setattr(plan, "model_dir", lambda model: str(folder))
    assert request_lengths(plan, run) is None  # not prepared: job_memory plans with its assumed lengths
    (folder / "muke_model.json").write_text(json.dumps({"path": str(wide_model)}))
    tok = AutoTokenizer.from_pretrained(wide_model)
    mem = run.memories.params["memory"]
    requests, _ = load_requests_checked(run.dataset.path, run.dataset.format)
    seqs = [encode(tok, r.question, r.answer, tok.eos_token, mem["window"]) for r in requests[: run.dataset.limit]]
    got = request_lengths(plan, run)
    assert (got.prompt, got.answer) == (max(len(s.prompt_ids) for s in seqs), max(len(s.target_ids) for s in seqs))
    assert got.answer < Lengths().answer
    memories = {j["identity"]: j for j in job_memory(plan)}[run.memories.identity]
    assumed = {j["identity"]: j for j in job_memory(plan, from_requests=False)}[run.memories.identity]
    assert memories["cpu_bytes"] < assumed["cpu_bytes"]
