"""benchmarks/gpu_check.py runs end to end with --tiny on the CPU, importing nothing of the workflow's stack."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the GPU machine lacks (or the check must not need): the workflow, lm-eval and the metric packages
ABSENT = {"snakemake", "lm_eval", "bert_score", "sentence_transformers", "nltk", "rouge_score", "sacrebleu", "pandas"}
RUN = """
import runpy, sys
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
finally:
    print("MODULES", " ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_gpu_check_tiny_runs_every_phase_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--tiny", "--steps", "3", "--docs", "20", "--max-new-tokens", "16", "--threads", "1", "--budget", "120"]
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for phase in ("statistics", "muke-memit: target memories z", "alphaedit: update ΔW", "generation, both edits"):
        assert phase in out
    assert "answers that differ between the two generation paths: 0/4" in out
    assert "ratio straightforward / fast, δ optimisation (z)" in out and "gpu_check: OK" in out
    modules = set(out.split("MODULES", 1)[1].split())
    assert not modules & ABSENT, sorted(modules & ABSENT)
