"""Offline compute nodes: `muke prefetch` fetches a config's models, statistics corpora, lm-eval datasets
and NLTK data (here through a faked hub: this machine has none), and an offline job that lacks one
fails with a message naming it."""

import copy
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import yaml

import muke.cli as cli
import muke.eval.locality as LOCALITY
from muke.hub import OfflineMissing, missing_offline
from muke.update.corpus import _subset, load_corpus
from muke.workflow.plan import Plan
from muke.workflow.stages.prepare_model import prepare_model

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
HUB_MODEL = "muke-test/Tiny-Instruct"
HUB_CORPUS = "hf:muke-test/wiki:20231101.en"


def hub_config() -> dict:
    """The tiny config with its model and statistics corpus on the hub, and IFEval among its tasks."""
    config = copy.deepcopy(TINY)
    config["models"] = {"tiny": {"preset": "tiny", "source": HUB_MODEL, "revision": "abc123"}}
    config["stats"] = {"corpus": HUB_CORPUS, "max_docs": 2}
    return config


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, tiny_qwen2_path):
    """The hub layer replaced: snapshot_download answers with the local tiny model, the corpus stream with a
    small in-memory corpus (other datasets load as they do); each call is recorded. punkt_tab is taken
    as present."""
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        calls.append(("model", repo_id, revision, tuple(allow_patterns)))
        return str(tiny_qwen2_path)

    def hf_documents(corpus, max_docs, seed, text_field):  # the streamed train split of a small corpus
        name, _, config = corpus[3:].partition(":")
        calls.append(("dataset", name, config, "train"))
        docs = ["Velmora is a port.", "Bread rises.", "Rivers run."]
        return [docs[i] for i in _subset(len(docs), max_docs, seed)], {"corpus": corpus, "n_corpus_documents": 3}

    monkeypatch.setenv("MUKE_CACHE", str(tmp_path / "muke-cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("muke.update.corpus.hf_documents", hf_documents)
    monkeypatch.setattr(LOCALITY, "ensure_punkt_tab", lambda: calls.append(("nltk", "punkt_tab")) or Path("punkt"))
    return calls


def test_prefetch_fetches_models_corpora_lm_eval_datasets_and_nltk_data(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(REPO / "resources")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(hub_config()))
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", "restored after the test")  # the command sets it for its process
    assert cli.main(["prefetch", "--configfile", "config.yaml", "--hf-home", str(hf_home)]) == 0
    assert ("model", HUB_MODEL, "abc123") == fake_hub[0][:3] and "*.safetensors" in fake_hub[0][3]
    assert ("dataset", "muke-test/wiki", "20231101.en", "train") in fake_hub
    assert ("nltk", "punkt_tab") in fake_hub  # the config's locality runs muke_ifeval_demo
    out = capsys.readouterr().out
    assert f"model tiny: {HUB_MODEL}" in out and "statistics corpus hf:muke-test/wiki:20231101.en: 2 of 3" in out
    assert "lm-eval tasks ['muke_mmlu_demo', 'muke_ifeval_demo']: 2 built" in out
    assert os.environ["HF_HOME"] == str(hf_home)  # where the hub layer was told to put it
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a compute node reads the streamed subset from MUKE_CACHE
    assert load_corpus(HUB_CORPUS, max_docs=2)[0] and [c[0] for c in fake_hub].count("dataset") == 1


def test_an_offline_job_missing_its_model_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(REPO / "resources")
    config = hub_config()
    config["models"]["tiny"]["source"] = "muke-test/never-fetched"
    model = Plan(config).models["tiny"]
    with pytest.raises(OfflineMissing) as caught:  # the real hub client, offline, with an empty cache
        prepare_model(json.loads(model.spec.to_json()), tmp_path / "models" / model.id)
    message = str(caught.value)
    assert "model muke-test/never-fetched at revision abc123 is not in the local caches" in message
    assert "HF_HOME=" in message and "muke prefetch --configfile" in message
    assert not (tmp_path / "models" / model.id).exists()


def test_an_offline_statistics_corpus_miss_names_the_corpus(monkeypatch):
    from muke.update.corpus import load_corpus

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OfflineMissing, match="statistics corpus hf:muke-test/never-fetched is not in the local"):
        load_corpus("hf:muke-test/never-fetched")


def test_online_errors_pass_unchanged(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(FileNotFoundError, match="gone"):
        with missing_offline("a model"):
            raise FileNotFoundError("gone")


def test_a_gpu_job_whose_model_files_are_missing_names_them(tmp_path, monkeypatch):
    """A node that lacks the snapshot prepare_model referenced (a cache not shared with the submit host)."""
    from muke.io import write_json
    from muke.workflow.stages.common import MODEL_REF, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "hf" / "hub" / "models--muke-test--Tiny" / "snapshots" / "abc123"
    write_json(tmp_path / "model" / MODEL_REF, {"source": HUB_MODEL, "path": str(snapshot)})
    with pytest.raises(
        OfflineMissing, match=f"model {HUB_MODEL} \\(prepared in .*files at {snapshot}\\) is not in the local"
    ):
        load_model(tmp_path / "model", "float32", "cpu")
