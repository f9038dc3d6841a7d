"""The report's CUDA / GPU facts are those the GPU jobs recorded in their manifests, not the facts of
the process (the submit host) that builds the report."""

from test_report import _edit_metrics, _locality

from muke.eval import tables
from muke.eval.report import build_report
from muke.io import write_json

GPU_HOST = {
    "hostname": "gpu-node-7",
    "gpus": "NVIDIA H100 80GB HBM3",
    "cuda available": True,
    "cuda (build)": "12.4",
    "torch": "2.5.1+cu124",
    "cudnn": 90100,
    "determinism": "GPU: torch.backends.cudnn.deterministic=False, ...",
}


def test_hardware_comes_from_the_jobs_manifests(tmp_path):
    for job in ("generate/a", "generate/b", "update_weights/a"):
        write_json(tmp_path / job / "manifest.json", {"identity": job, "host": GPU_HOST})
    runs = [
        {
            "manifests": {
                "generate": str(tmp_path / f"generate/{k}/manifest.json"),
                "update_weights": str(tmp_path / "update_weights/a/manifest.json"),
                "locality": str(tmp_path / "never-ran/manifest.json"),  # a stage whose job has not run
            }
        }
        for k in ("a", "b")
    ]
    jobs = tables.job_hosts(runs)
    assert jobs[["stage", "jobs"]].values.tolist() == [["generate", 2], ["update_weights", 1]]
    text = build_report(_edit_metrics(), _locality(), tmp_path / "out", jobs=jobs).read_text()
    repro = text[text.index("id='repro'") :]
    assert "NVIDIA H100 80GB HBM3" in repro and "gpu-node-7" in repro and "GPU: torch.backends" in repro
    assert "report process" not in repro.split("Package versions")[0]


def test_without_manifests_the_report_says_whose_facts_it_shows(tmp_path):
    assert tables.job_hosts([{"manifests": {"generate": str(tmp_path / "none.json")}}]) is None
    text = build_report(_edit_metrics(), _locality(), tmp_path / "out").read_text()
    assert "the facts below are the report process" in text
