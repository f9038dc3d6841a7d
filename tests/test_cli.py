"""The `muke` command line, called in-process: subcommands, JSON output, one-line errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import muke.cli as cli
from muke.engine.windows import encode
from muke.model import load
from muke.update.edit import target_nll
from muke.update.stats import load_stats
from muke.update.weights import WeightUpdate, apply

SMALL = [
    "--layers",
    "1",
    "2",
    "--unke-layers",
    "1",
    "--window",
    "4",
    "--v-steps",
    "3",
    "--unke-steps",
    "5",
    "--n-preserve",
    "3",
    "--max-new-tokens",
    "4",
    "--mom2-update-weight",
    "100",
]
REQUEST = ["--question", "What is the city of Velmora known for?", "--answer", "Velmora is a port city."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("Velmora is a port city.\n\nThe Copper Bridge has seven arches.\n\nSalt traders founded it.\n")
    return path


def run_stats(model, corpus, out, *extra: str) -> int:
    """`muke stats` of layers 1 and 2 over the corpus's first 3 documents."""
    argv = ["stats", "--model", str(model), "--layers", "1", "2", "--corpus", str(corpus), "--out", str(out)]
    return cli.main([*argv, "--max-docs", "3", *extra, "--quiet"])


@pytest.fixture(scope="module")
def stats_file(tiny_qwen2_path, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "s.safetensors"
    assert run_stats(tiny_qwen2_path, corpus, out) == 0
    return out


def json_rows(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_stats_command_writes_a_loadable_file(stats_file, tiny_qwen2_path):
    stats = load_stats(stats_file, load(tiny_qwen2_path), [1, 2])
    assert stats.meta["n_documents"] == 3 and stats.count[1] > 0


def test_stats_command_no_pack_gives_the_same_moments(stats_file, tiny_qwen2_path, corpus, tmp_path):
    out = tmp_path / "unpacked.safetensors"
    assert run_stats(tiny_qwen2_path, corpus, out, "--no-pack") == 0
    em = load(tiny_qwen2_path)
    packed, unpacked = load_stats(stats_file, em, [1, 2]), load_stats(out, em, [1, 2])
    assert packed.meta["pack"] is True and unpacked.meta["pack"] is False
    for layer in (1, 2):
        assert unpacked.count[layer] == packed.count[layer]
        torch.testing.assert_close(unpacked.second_moment(layer), packed.second_moment(layer), rtol=1e-4, atol=1e-6)


def test_edit_json_with_stats_file(tiny_qwen2_path, stats_file, capsys, tmp_path):
    code = cli.main(
        [
            "edit",
            "--model",
            str(tiny_qwen2_path),
            "--method",
            "muke-memit",
            *REQUEST,
            "--para-question",
            "Why is Velmora notable?",
            "--stats",
            str(stats_file),
            *SMALL,
            "--json",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    (row,) = json_rows(capsys.readouterr().out)
    for key in (
        "id",
        "method",
        "generated",
        "target",
        "bleu",
        "rouge_l",
        "seconds",
        "generated_pre",
        "nll_pre",
        "nll_post",
        "para_generated",
        "para_rouge_l",
    ):
        assert key in row, key
    assert row["method"] == "muke-memit" and row["target"] == "Velmora is a port city."
    assert row["nll_post"] < row["nll_pre"]
    assert (tmp_path / "run" / "updates" / "cli-0.safetensors").exists()
    assert json_rows((tmp_path / "run" / "results.jsonl").read_text())[0]["id"] == "cli-0"

    out = tmp_path / "exported"
    assert (
        cli.main(
            [
                "export",
                "--model",
                str(tiny_qwen2_path),
                "--updates",
                str(tmp_path / "run" / "updates" / "cli-0.safetensors"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    AutoModelForCausalLM.from_pretrained(out)
    assert "What is the city of Velmora known for?" in (out / "README.md").read_text()  # the model card


def test_edit_requests_file_text_output_and_default_stats_cache(tiny_qwen2_path, corpus, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MUKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("muke.cli.edit.DEMO_CORPUS", corpus)
    requests = tmp_path / "r.jsonl"
    requests.write_text(
        json.dumps({"id": "a", "question": "Who founded Velmora?", "answer": "Salt traders."})
        + "\n"
        + json.dumps({"id": "b", "question": "What is the Copper Bridge?", "answer": "A bridge."})
        + "\n"
    )
    args = [
        "edit",
        "--model",
        str(tiny_qwen2_path),
        "--method",
        "memit",
        "--requests",
        str(requests),
        "--format",
        "jsonl",
        *SMALL,
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "[a] memit" in out and "[b] memit" in out and "post-edit" in out and "ROUGE-L" in out
    cached = list((tmp_path / "cache" / "stats").glob("*.safetensors"))
    assert len(cached) == 1
    assert cli.main(args + ["--method", "unke", "--json", "--limit", "1"]) == 0  # UnKE needs no statistics
    assert [r["id"] for r in json_rows(capsys.readouterr().out)] == ["a"]
    assert list((tmp_path / "cache" / "stats").glob("*.safetensors")) == cached


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "rome", *REQUEST], "unknown method 'rome'"),
        (["--method", "memit", "--requests", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
        (["--method", "memit", "--question", "only a question"], "--answer"),
        (["--method", "muke-memit", *REQUEST, "--layers", "1", "9"], "layer 9 is out of range"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_qwen2_path, capsys, args, message):
    assert cli.main(["edit", "--model", str(tiny_qwen2_path), *args, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("muke: error:") and message in err


def test_stats_for_other_layers_is_refused(tiny_qwen2_path, stats_file, capsys):
    code = cli.main(
        [
            "edit",
            "--model",
            str(tiny_qwen2_path),
            "--method",
            "muke-memit",
            *REQUEST,
            *SMALL,
            "--layers",
            "0",
            "1",
            "--stats",
            str(stats_file),
        ]
    )
    assert code == 2
    assert "not the requested layers [0]" in capsys.readouterr().err


def test_tiny_model_and_prepare_commands_are_wired(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(
        "muke.tiny.build_tiny_model",
        lambda arch, out, seed, corpus_path, pretrain_steps: calls.append((arch, seed, pretrain_steps)) or out,
    )
    monkeypatch.setattr("muke.smollm.prepare_smollm2", lambda out, wheel_dir: calls.append(("smollm2", out)) or out)
    assert (
        cli.main(
            ["tiny-model", "--arch", "llama", "--out", str(tmp_path / "m"), "--seed", "3", "--pretrain-steps", "5"]
        )
        == 0
    )
    assert cli.main(["prepare-smollm2", "--out", str(tmp_path / "s")]) == 0
    assert calls == [("llama", 3, 5), ("smollm2", str(tmp_path / "s"))]


SEQUENTIAL_REQUESTS = [
    {"id": "a", "question": "What is Velmora known for?", "answer": "Velmora is a port city."},
    {"id": "b", "question": "Who founded Orlan?", "answer": "Orlan was founded by salt traders."},
    {"id": "c", "question": "Where is Kest?", "answer": "Kest lies by Lake Amber."},
]


def test_edit_sequential_reports_each_request_after_its_batch_and_after_the_last(
    tiny_qwen2_path, stats_file, capsys, tmp_path
):
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in SEQUENTIAL_REQUESTS))
    argv = ["edit", "--model", str(tiny_qwen2_path), "--method", "muke-memit", "--requests", str(requests)]
    argv += ["--stats", str(stats_file), *SMALL, "--json", "--sequential", "--batch-size", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [(r["id"], r["batch"], r["n_edits"]) for r in rows] == [("a", 0, 3), ("b", 0, 3), ("c", 1, 3)]
    for r in rows:
        for key in ("own_generated", "own_bleu", "own_rouge_l", "nll_own", "generated", "bleu", "nll_post", "nll_pre"):
            assert key in r, key
    # the last batch's own answers are those of the final model; the first batch's were given before batch 2
    assert rows[2]["own_generated"] == rows[2]["generated"] and rows[2]["nll_own"] == rows[2]["nll_post"]
    assert rows[0]["nll_own"] != rows[0]["nll_post"]
    assert rows[0]["nll_own"] < rows[0]["nll_pre"]

    # the saved chain, applied in order, is the final model: it reproduces the final target NLL
    files = sorted((tmp_path / "run" / "updates").iterdir())
    assert [f.name[:4] for f in files] == ["0000", "0001"]
    chain = [WeightUpdate.load(f) for f in files]
    assert [u.request_ids for u in chain] == [["a", "b"], ["c"]]
    em = load(tiny_qwen2_path)
    seq = encode(
        em.tokenizer, SEQUENTIAL_REQUESTS[0]["question"], SEQUENTIAL_REQUESTS[0]["answer"], em.end_of_turn, None
    )
    with apply(em, chain):
        assert abs(target_nll(em, seq) - rows[0]["nll_post"]) < 1e-5
    assert len(json_rows((tmp_path / "run" / "results.jsonl").read_text())) == 3


def test_edit_sequential_takes_the_sequence_options(tiny_qwen2_path, stats_file, capsys, tmp_path):
    """--resolve-every 2: the second batch's ΔW is the re-solving link (dense, info resolved); --preserve-earlier:
    each MEMIT link keeps its edit keys; a backend that cannot honour an option is refused by name."""
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in SEQUENTIAL_REQUESTS))
    argv = ["edit", "--model", str(tiny_qwen2_path), "--method", "muke-memit", "--requests", str(requests)]
    argv += ["--stats", str(stats_file), *SMALL, "--json", "--sequential", "--batch-size", "2"]
    argv += ["--resolve-every", "2", "--preserve-earlier", "--weight-growth", "0.5"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    first, second = (WeightUpdate.load(f) for f in sorted((tmp_path / "run" / "updates").iterdir()))
    assert first.factors and not first.params and first.keys
    assert second.params and not second.factors and second.info["resolved"] and second.info["resolved_edits"] == 3
    unke = ["edit", "--model", str(tiny_qwen2_path), "--method", "muke-unke", "--requests", str(requests)]
    assert cli.main([*unke, "--stats", str(stats_file), *SMALL, "--sequential", "--preserve-earlier"]) != 0
    assert "preserve_earlier: backend 'unke'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [[], ["--sequential"]], ids=["single", "sequential"])
def test_edit_scores_the_target_nll_on_the_prompts_the_preset_renders(
    tiny_qwen2_path, stats_file, capsys, monkeypatch, tmp_path, mode
):
    """The NLL before, after (and after its own batch) is that of the prompt with the preset's system turn."""
    import muke.update.edit

    system = "You are a terse archivist."
    preset = tmp_path / "system.yaml"
    preset.write_text(json.dumps({"system_prompt": system}))
    prompts, target_nll = [], muke.update.edit.target_nll
    monkeypatch.setattr(
        muke.update.edit, "target_nll", lambda em, seq: prompts.append(seq.prompt) or target_nll(em, seq)
    )
    argv = ["edit", "--model", str(tiny_qwen2_path), "--method", "muke-memit", *REQUEST, "--stats", str(stats_file)]
    assert cli.main([*argv, *SMALL, "--preset", str(preset), "--json", *mode]) == 0
    (row,) = json_rows(capsys.readouterr().out)
    assert system in row["prompt"] and len(prompts) >= (3 if mode else 2)
    assert set(prompts) == {row["prompt"]}
    em = load(tiny_qwen2_path)
    seq = encode(em.tokenizer, REQUEST[1], REQUEST[3], em.end_of_turn, None, system_prompt=system)
    assert abs(target_nll(em, seq) - row["nll_pre"]) < 1e-5


def test_prepare_model_converts_a_gguf_recipe_into_the_cache_by_default(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setenv("MUKE_CACHE", str(tmp_path))
    monkeypatch.setattr("muke.gguf.prepare_gguf", lambda name, out, wheel_dir: calls.append((name, str(out))) or out)
    assert cli.main(["prepare-model", "gemma3-270m"]) == 0
    assert cli.main(["prepare-model", "smollm2", "--out", str(tmp_path / "s")]) == 0
    assert calls == [("gemma3-270m", str(tmp_path / "models" / "gemma-3-270m")), ("smollm2", str(tmp_path / "s"))]
    with pytest.raises(SystemExit):
        cli.main(["prepare-model", "gemma-2b"])
    assert "invalid choice" in capsys.readouterr().err
