"""The tuned SmolLM2 preset makes an edit take (issue 14): one μKE edit of a demo request, written into the
weights (no hooks), and greedy decoding, prompted as the edit was (the preset's system turn), reproduces the
first 40 tokens of its target. demo-05 (a real topic) does under fp32 and bf16 δ passes alike; the invented
demo-00 drifts under both (docs/STUDY-smollm2.md, study 6)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from muke.data import RESOURCES, load_requests
from muke.engine.windows import encode
from muke.eval.generate import greedy
from muke.model import load
from muke.update.edit import edit
from muke.update.stats import StatsConfig, cached_stats
from muke.update.weights import apply
from muke.workflow.config import load_preset

pytestmark = pytest.mark.slow
PREFIX_TOKENS = 40
REQUEST = "demo-05"


@pytest.fixture(scope="module")
def smollm(smollm2_path):
    return load(smollm2_path, device="cpu")


@pytest.mark.parametrize("method", ["muke-memit"])
def test_a_tuned_edit_reproduces_the_targets_first_40_tokens(smollm, method):
    em = smollm
    _, preset = load_preset("smollm2-135m-instruct")
    hparams = preset["hparams"]
    (request,) = [r for r in load_requests(RESOURCES / "demo_edits.jsonl", "jsonl") if r.id == REQUEST]
    stats = cached_stats(
        em, StatsConfig(layers=tuple(hparams["layers"]), corpus=str(RESOURCES.parent / preset["stats"]["corpus"]))
    )
    seq = encode(em.tokenizer, request.question, request.answer, em.end_of_turn, None)
    prefix = em.tokenizer.decode(seq.target_ids[:PREFIX_TOKENS])
    chat = {"system_prompt": hparams.get("system_prompt")}
    (before,) = greedy(em, [request.question], max_new_tokens=PREFIX_TOKENS + 8, **chat)
    assert not before.text.startswith(prefix)  # the unedited model does not know it
    update, _ = edit(em, [request], method, hparams, stats)
    with apply(em, update):
        (after,) = greedy(em, [request.question], max_new_tokens=PREFIX_TOKENS + 8, **chat)
    assert after.text.startswith(prefix), f"target: {prefix!r}\nedited:  {after.text!r}"
