"""The HTML report: paper-style tables, embedded plots, reproducibility facts, and a headless-browser render."""

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from muke.eval.environment import gpu_stages, memory_table
from muke.eval.report import build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ["muke-memit", "anyedit-memit"]
KINDS = ["question", "para_question"]
FAMILIES = ["paper", "standard"]
GiB = 1024**3
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _edit_metrics() -> pd.DataFrame:
    """2 methods × 2 kinds × 2 families × 2 swept step counts, plus pre-edit rows; values distinct, each
    with an interval mean ± 1 (so each method's lies above pre-edit's); repetition 0.1 per method beside
    the targets' 0.02."""
    rows = []
    for m, method in enumerate(["pre-edit"] + METHODS):
        for k, kind in enumerate(KINDS):
            for f, family in enumerate(FAMILIES):
                for s, steps in enumerate([10, 25]):
                    base = 10 * m + 3 * k + f + 0.5 * s + 0.123
                    rows.append(
                        dict(
                            model="qwen",
                            dataset="unke",
                            method=method,
                            setting="",
                            kind=kind,
                            family=family,
                            bleu=base,
                            rouge_l=base + 20,
                            bertscore=base + 40,
                            n=4,
                            v_num_grad_steps=steps,
                            repetition=0.1 * m,
                            target_repetition=0.02,
                            **{
                                f"{metric}_ci_{side}": value + sign
                                for metric, value in (("bleu", base), ("rouge_l", base + 20), ("bertscore", base + 40))
                                for side, sign in (("low", -1), ("high", 1))
                            },
                        )
                    )
    return pd.DataFrame(rows)


def _locality() -> pd.DataFrame:
    """lm-eval's MMLU and IFEval and muke.eval.retention's first-token and prefix rows, pre-edit and edited."""
    rows = []
    for state, method, shift in [("edited", "muke-memit", -0.002), ("pre-edit", "pre-edit", 0.0)]:
        rows += [
            dict(model="qwen", method=method, model_state=state, task=task, metric=metric, value=value, stderr=None)
            for task, metric, value in (
                ("retention", "first_token_agreement", 1 + 50 * shift),
                ("text_shift", "first_token_kl", -10 * shift),
                ("retention", "prefix_exact_match", 1 + 100 * shift),
            )
        ]
        rows += [
            dict(
                model="qwen",
                method=method,
                model_state=state,
                task="mmlu",
                metric="acc",
                value=0.7345 + shift,
                stderr=0.0035,
            ),
            dict(
                model="qwen",
                method=method,
                model_state=state,
                task="ifeval",
                metric="prompt_level_strict_acc",
                value=0.7024 + shift,
                stderr=0.0197,
            ),
        ]
    return pd.DataFrame(rows)


def _per_sample() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method in METHODS:
        for i in range(40):
            tokens = int(rng.integers(20, 400))
            rows.append(
                dict(
                    method=method,
                    id=f"r{i}",
                    target_tokens=tokens,
                    family="paper",
                    kind="question",
                    bleu=float(100 - tokens / 5 + rng.normal(0, 5)),
                    category=["news", "code", "math"][i % 3],
                    v_num_grad_steps=[10, 25][i % 2],
                )
            )
    return pd.DataFrame(rows)


def _case_rows() -> pd.DataFrame:
    """Original-question answers of pre-edit and both methods to 10 requests (muke.eval.tables.case_rows);
    r0's pre-edit answer a long run without spaces (a degenerate model's)."""
    rows = pd.DataFrame(
        [
            dict(
                method=method,
                id=f"r{i}",
                kind="question",
                question=f"What is <r{i}>?",
                target=f"r{i} is a port city.",
                output=f"r{i} is {method}.",
            )
            for i in range(10)
            for method in ["pre-edit"] + METHODS
        ]
    )
    rows.loc[0, "output"] = "daboatschu." * 60
    return pd.concat([rows, _unrelated_rows()], ignore_index=True)


def _unrelated_rows() -> pd.DataFrame:
    """Retention answers (muke.eval.tables.unrelated_rows) of both methods' edits of r0–r5 (locality ran
    on the first 6 edits) to four prompts of four kinds; muke-memit's r0 edit turns the code answer into a
    long run without spaces, every other answer stays the unedited one."""
    prompts = [("p-q00", "question", "Which planet?"), ("p-i00", "instruction", "Write a haiku.")]
    prompts += [("p-c00", "code", "Square a number."), ("p-m00", "arithmetic", "17 + 25?")]
    rows = pd.DataFrame(
        [
            dict(method=m, id=f"r{i}", kind="unrelated", prompt_id=pid, prompt_kind=k, question=q, pre=f"{k} answer")
            for i in range(6)
            for m in METHODS
            for pid, k, q in prompts
        ]
    )
    broken = (rows["id"] == "r0") & (rows["method"] == "muke-memit") & (rows["prompt_id"] == "p-c00")
    return rows.assign(output=rows["pre"].where(~broken, "daboatschu." * 60))


def test_case_study_shows_unrelated_prompts_before_and_after_each_edit(report):
    _, text, _ = report
    blocks = re.findall(r"<section class='case-study'>.*?</section>", text[text.index("id='case-study'") :])
    assert len(blocks) == 8 and all("not measured for this request" in b for b in blocks[6:])
    tables = [re.search(r"<table class='text unrelated'>.*?</table>", b).group(0) for b in blocks[:6]]
    assert all(t.count("<tr>") == 4 and "17 + 25?" not in t for t in tables)
    assert tables[0].count("<b>changed</b>") == 1 and tables[1].count("unchanged") == 6
    assert "unrelated prompts answered before and after" in text


def _traces() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(method=method, id=f"r{i}", window=w, step=s, loss=(5 + i) * 0.8**s * (1 + m))
            for m, method in enumerate(METHODS)
            for i in range(3)
            for w in range(2)
            for s in range(25)
        ]
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Build the report once; returns (html path, html text, input paths)."""
    root = tmp_path_factory.mktemp("report")
    inputs = [root / "edits.jsonl", root / "corpus.txt"]
    inputs[0].write_text('{"id": "r0", "question": "q", "answer": "a"}\n')
    inputs[1].write_bytes(os.urandom(3000))
    bench = root / "benchmarks"
    (bench / "generate" / "qwen").mkdir(parents=True)
    (bench / "generate" / "qwen" / "shard0.tsv").write_text(
        BENCH_HEADER + "12.50\t0:00:12\t2048.25\t4096.00\t1900.00\t1950.00\t1.00\t2.00\t95.00\t11.80\n"
    )
    (bench / "report.tsv").write_text(
        BENCH_HEADER + "1.51\t0:00:01\t107.61\t325.11\t53.91\t74.48\t0.00\t0.01\t22.29\t0.70\n"
    )
    failures = pd.DataFrame([dict(id="r7<script>", stage="optimize_memories", reason="NaN loss")])
    config = {
        "seed": 1234,
        "models": {"qwen": {"preset": "qwen2.5-7b-instruct"}},
        "sweep": {"v_num_grad_steps": [10, 25]},
    }
    edit = _edit_metrics()
    edit.loc[edit["method"] == "anyedit-memit", "method"] = "anyedit-memit <b>"  # must be escaped
    path = build_report(
        edit,
        _locality(),
        root / "out",
        config=config,
        stage_identities={"memories": {"hash": "abc123", "v_lr": 0.5}, "stats": "L4-8-ffee"},
        inputs=inputs,
        benchmarks_dir=bench,
        traces=_traces(),
        failures=failures,
        per_sample=_per_sample(),
        case_rows=_case_rows(),
        memory_estimates=[
            dict(rule="generate", identity="qwen", host_bytes=GiB, device_bytes=2 * GiB, cpu_bytes=4 * GiB)
        ],
        title="test report",
    )
    return path, path.read_text(), inputs


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("<h3>", start + len(heading))
    return text[start : end if end > 0 else None]


def test_family_tables_hold_the_numbers(report):
    _, text, _ = report
    assert "paper family: char-level BLEU" in text and "standard family: sacrebleu" in text
    edit = _edit_metrics()
    for family in FAMILIES:
        table = _section(text, f"<h3>{family} family</h3>")
        for col in ("Ori", "Para", "BLEU", "BERTScore", "ROUGE-L", "repetition (target)"):
            assert f">{col}<" in table
        assert ">0.10 (0.02)<" in table and ">0.00 (0.02)<" in table
        row = edit[
            (edit.family == family)
            & (edit.method == "muke-memit")
            & (edit.kind == "para_question")
            & (edit.v_num_grad_steps == 25)
        ].iloc[0]
        for metric in ("bleu", "rouge_l", "bertscore"):
            assert f">{row[metric]:.2f}\u00a0▲ [{row[metric] - 1:.2f},\u00a0{row[metric] + 1:.2f}]<" in table
    assert "anyedit-memit &lt;b&gt;" in text and "anyedit-memit <b>" not in text


def test_sweep_table_and_csvs(report):
    path, text, _ = report
    assert "v_num_grad_steps=10" in text and "v_num_grad_steps=25" in text
    for name in (
        "edit_metrics_paper",
        "edit_metrics_standard",
        "locality",
        "input_checksums",
        "sweep_v_num_grad_steps_paper",
        "failures",
        "benchmarks",
        "peak_memory",
    ):
        assert (path.parent / f"{name}.csv").stat().st_size > 0
    paper = pd.read_csv(path.parent / "edit_metrics_paper.csv")
    assert "Ori BLEU" in paper.columns and len(paper) == 6  # 3 methods × 2 step counts


def test_integrity_view(report):
    """Per run: efficacy, paraphrase beside the unedited model's, repetition vs target, the retention rows."""
    path, text, _ = report
    assert "<a href='#integrity'>Integrity</a>" in text
    view = text[text.index("id='integrity'") : text.index("id='case-study'")]
    for col in ("question BLEU", "paraphrase BLEU", "repetition (target)", "first-token agreement"):
        assert f">{col}<" in view
    assert ">first-token KL<" in view and ">prefix exact match<" in view and ">mmlu acc<" in view
    assert ">13.12 (3.12)<" in view and ">90.00<" in view and ">80.00<" in view and ">0.02<" in view
    assert view.index("pre-edit") < view.index("muke-memit")
    table = pd.read_csv(path.parent / "integrity.csv")
    assert len(table) == 6 and "paraphrase BLEU" in table.columns


def test_integrity_marks_a_drop_below_the_unedited_model():
    from muke.eval.integrity import integrity_table

    def row(method, kind, bleu, rouge_l):
        return dict(model="m", dataset="d", method=method, kind=kind, family="paper", bleu=bleu, rouge_l=rouge_l)

    edit = pd.DataFrame(
        [
            row("pre-edit", "para_question", 30.0, 40.0),
            row("pre-edit", "sub_questions", 30.0, 40.0),
            row("a", "para_question", 20.0, 50.0),
            row("a", "sub_questions", 35.0, 10.0),
            row("pre-edit", "question", 5.0, 5.0),
            row("a", "question", 90.0, 90.0),
        ]
    )
    t = integrity_table(edit, None)
    assert t.index.get_level_values("method").tolist() == ["pre-edit", "a"]
    assert t.loc[("m", "d", "a"), "paraphrase BLEU"] == "20.00\u00a0▼ (30.00)"
    assert t.loc[("m", "d", "a"), "sub-question ROUGE-L"] == "10.00\u00a0▼ (40.00)"
    assert t.loc[("m", "d", "pre-edit"), "paraphrase BLEU"] == "30.00"
    assert t.loc[("m", "d", "a"), "question BLEU"] == "90.00" and "repetition (target)" not in t
    better = integrity_table(edit.assign(bleu=edit["bleu"].where(edit["method"] != "a", 99.0)), None)
    assert better.loc[("m", "d", "a"), "paraphrase BLEU"] == "99.00 (30.00)"


def test_locality_table_pre_edit_first(report):
    _, text, _ = report
    table = text[text.index("id='locality'") : text.index("id='plots'")]
    assert "73.45 ± 0.35" in table and "73.25 ± 0.35" in table and "70.24 ± 1.97" in table
    assert table.index("pre-edit") < table.index("edited")


def test_plots_are_embedded_pngs(report):
    _, text, _ = report
    images = re.findall(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) >= 4  # length, sweep, categories, traces
    for data in images:
        raw = base64.b64decode(data)
        assert raw.startswith(PNG_SIGNATURE)
        pil = pytest.importorskip("PIL.Image")
        pil.open(io.BytesIO(raw)).verify()


def test_failures_and_reproducibility(report):
    _, text, inputs = report
    assert "Failed requests: <b>1</b>" in text and "r7&lt;script&gt;" in text and "<script>" not in text
    for p in inputs:
        assert hashlib.sha256(p.read_bytes()).hexdigest() in text
    assert f"<td>{pd.__version__}</td>" in text
    assert "seed = 1234" in text and "abc123" in text and "L4-8-ffee" in text
    assert "git commit" in text and "deterministic" in text
    assert re.search(r"<th>generate</th>\s*<td>1</td>\s*<td>12.50</td>\s*<td>12.50</td>\s*<td>2048.25</td>", text)
    memory = _section(text, "<h3>Peak memory per job")
    assert "±25 %" in memory
    # 2048.25 MiB measured, 4 GiB estimated (a CPU job: no manifest saw a GPU), no device figure
    assert re.search(r"<th>qwen</th>\s*<td>2.00</td>\s*<td>4.00</td>\s*<td>—</td>\s*<td>0.50</td>", memory)
    assert re.search(r"<th>report</th>\s*<th>report</th>\s*<td>0.11</td>\s*<td>—</td>", memory)  # no estimate
    assert "qwen2.5-7b-instruct" in text


def test_memory_table_joins_benchmarks_and_estimates():
    """Shards of a job together (the largest max_rss, MiB); the host figure of a GPU stage with its device
    figure, the CPU figure elsewhere; NaN where a job has no benchmark file or no estimate."""
    jobs = [
        "generate/m/d/a-aaa111/shard0.tsv",
        "generate/m/d/a-aaa111/shard1.tsv",
        "update_weights/m/d/a-bbb222/shard0.tsv",
    ]
    bench = pd.DataFrame(
        {
            "rule": ["generate", "generate", "update_weights", "score"],
            "job": [*jobs, "score/m/d/a-ccc333.tsv"],
            "max_rss": [1024.0, 2048.0, 512.0, 100.0],
        }
    )
    estimates = [
        dict(rule=rule, model="m", identity=i, host_bytes=GiB, device_bytes=2 * GiB, cpu_bytes=cpu * GiB)
        for rule, i, cpu in [("generate", "aaa111", 4), ("update_weights", "bbb222", 8), ("collect_stats", "ddd444", 3)]
    ]
    t = memory_table(bench, estimates, gpu_stages={"update_weights"})
    assert list(t.index) == [
        ("collect_stats", "ddd444"),
        ("generate", "m/d/a-aaa111"),
        ("score", "m/d/a-ccc333"),
        ("update_weights", "m/d/a-bbb222"),
    ]
    cols = ["measured GiB", "estimate GiB", "estimate device GiB", "measured / estimate"]
    np.testing.assert_allclose(
        t[cols].to_numpy(dtype=float),
        [
            [np.nan, 3.0, np.nan, np.nan],
            [2.0, 4.0, np.nan, 0.5],
            [100 / 1024, np.nan, np.nan, np.nan],
            [0.5, 1.0, 2.0, 0.5],
        ],
    )
    assert memory_table(pd.DataFrame(), []).empty


def test_gpu_stages_follow_the_manifests_unless_the_config_says_cpu():
    jobs = pd.DataFrame({"stage": ["generate", "locality", "generate"], "cuda available": ["True", "False", "False"]})
    assert gpu_stages({"runtime": {"device": "auto"}}, jobs) == {"generate"}
    assert gpu_stages({"runtime": {"device": "cpu"}}, jobs) == set()
    assert gpu_stages({}, None) == set()


def test_skipped_plots_are_noted(tmp_path):
    edit = _edit_metrics().drop(columns="v_num_grad_steps").drop_duplicates(["method", "kind", "family"])
    text = build_report(
        edit,
        _locality(),
        tmp_path,
        config={},
        stage_identities={},
        inputs=[],
        benchmarks_dir=None,
        traces=None,
        failures=None,
        per_sample=None,
    ).read_text()
    assert text.count("class='note'") >= 4 and "<img" not in text


def _chromium() -> str | None:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None and os.environ.get("MUKE_INSTALL_CHROMIUM") == "1" and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        path = shutil.which("chromium")
    return path


# Counts the case-study tables wider than their box, into <body data-wide-cases> (read back by --dump-dom).
WIDE_CASES = (
    "<script>document.body.dataset.wideCases = [...document.querySelectorAll('.case-study .scroll')]"
    ".filter(box => box.scrollWidth > box.clientWidth).length</script>"
)


def test_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (set MUKE_INSTALL_CHROMIUM=1 as root to install it)")
    path, _, _ = report
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = path.resolve().as_uri()
    shot = tmp_path / "page.png"
    subprocess.run(
        flags + [f"--screenshot={shot}", "--window-size=1280,4000", url], capture_output=True, timeout=60, check=True
    )
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text().replace("</body>", f"{WIDE_CASES}</body>"))
    dom = subprocess.run(
        flags + ["--window-size=1280,4000", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert dom.count("<table") >= 4 + 8 and dom.count("<img") >= 4 and "Locality (Table 2)" in dom
    assert "Case study (paper App. C)" in dom and dom.count('<section class="case-study">') == 8
    assert dom.count('<table class="text unrelated">') == 6 and dom.count("not measured for this request") == 2
    assert 'data-wide-cases="0"' in dom  # r0's answers without spaces wrap inside their columns
    raw = shot.read_bytes()
    assert raw.startswith(PNG_SIGNATURE) and len(raw) > 20_000
    try:
        from PIL import Image
    except ImportError:
        return
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5


def test_edits_still_short_after_their_last_pass_are_listed_under_failures(tmp_path):
    """muke.eval.tables.unsettled reads the update index's and a sequential run's chain's `unsettled` (the chain's
    batches up to the run's checkpoint); the report lists each such request, and says nothing where every pass
    settled (or no update ran in passes)."""
    from muke.eval import tables
    from muke.io import record_sha256, write_parquet
    from muke.workflow.stages.common import chain_unsettled

    run = dict(zip(tables.LABELS, ["qwen", "unke", "muke-memit", "", None, None]))
    run["files"] = {"shards": [{"memories": None, "update": str(tmp_path / "muke-memit-abc" / "shard0.parquet")}]}
    short = {"r3": {"short": [4, 5], "off_target": []}, "r4": {"short": [0, 1], "off_target": [1]}}
    rows = [{"unsettled": short}, {"unsettled": {}}, {"unsettled": None}]
    found = tables.unsettled([run], lambda shard: ({}, rows))
    assert found[["id", "off_target_windows", "short_windows", "run"]].values.tolist() == [
        ["r4", "[1]", "[0, 1]", "muke-memit-abc"],  # the answer that leaves its target first
        ["r3", "[]", "[4, 5]", "muke-memit-abc"],
    ]
    text = build_report(_edit_metrics(), _locality(), tmp_path / "out", unsettled=found).read_text()
    listed = text[text.index("id='failures'") :]
    assert "after the last edit pass: <b>2</b>; their answer leaves the target: <b>1</b>" in listed
    assert "[4, 5]" in listed and pd.read_csv(tmp_path / "out" / "unsettled.csv")["id"].tolist() == ["r4", "r3"]
    chain = tmp_path / "muke-memit-def" / "chain.parquet"
    chain.parent.mkdir()
    write_parquet(
        pd.DataFrame(
            {
                "batch": [0, 1, 2],
                "n_edits": [1, 2, 3],
                "unsettled": [
                    json.dumps({"r1": {"short": [2], "off_target": [2]}}),
                    None,
                    json.dumps({"r2": {"short": [1, 3], "off_target": []}}),
                ],
            }
        ),
        chain,
    )
    record_sha256(chain)
    seq = {**run, "files": {"shards": [], "chain": str(chain), "n_edits": 2}}
    assert chain_unsettled(chain, 3)[1] == {"batch": 2, "unsettled": {"r2": {"short": [1, 3], "off_target": []}}}
    after_two = tables.unsettled([seq], None, chain_unsettled)
    assert after_two[["id", "off_target_windows", "batch", "run"]].values.tolist() == [
        ["r1", "[2]", 0, "muke-memit-def"]
    ]
    settled = tables.unsettled([run], lambda shard: ({}, rows[1:]))
    assert (
        "after the last edit pass"
        not in build_report(_edit_metrics(), _locality(), tmp_path / "q", unsettled=settled).read_text()
    )
