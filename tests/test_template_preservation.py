"""The template's keys preserved (docs/ALGORITHM.md §5, "Template preservation"): C_t over the chat template's own
positions of unrelated chat prompts, in MEMIT's solve and AlphaEdit's null space; UnKE's chat-rendered
preservation samples."""

import json
import random

import pytest
import torch

from muke.data import DEFAULT_PRESERVATION
from muke.engine.windows import encode, render_prompt
from muke.model import load
from muke.update import template_keys
from muke.update.edit import compute_update
from muke.update.keys import Target, read_layer
from muke.update.memit import memit_solve
from muke.update.methods import resolve_method
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.template_keys import (
    EVALUATION_PROMPTS,
    template_positions,
    template_questions,
    template_stats,
)
from muke.update.unke import load_preservation, preservation_texts
from muke.update.weights import apply

QUESTION = "What is the city of Velmora known for?"
ANSWER = "Velmora is a port city famous for its Copper Bridge."
LAYER = 2


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture(scope="module")
def stats(em, tmp_path_factory, request):
    cfg = StatsConfig(layers=(0, 1, 2), corpus=str(request.config.rootpath / "resources/demo_corpus.txt"), max_docs=150)
    return load_stats(collect_stats(em, cfg, tmp_path_factory.mktemp("stats") / "s.safetensors", False), em, [0, 1, 2])


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MUKE_CACHE", str(tmp_path / "cache"))


def template_keys_of(em, questions, layer=LAYER) -> torch.Tensor:
    """(d_ff, m) down_proj inputs of `layer` at the template positions of `questions`, one prompt at a time."""
    out = []
    for q in questions:
        ids, positions = template_positions(em.tokenizer, q)
        K, _ = read_layer(em, layer, layer, torch.tensor([ids]))
        out.append(K[positions])
    return torch.cat(out).T


def test_template_positions_are_the_tokens_after_the_question(em):
    for system in (None, "Be brief."):
        ids, positions = template_positions(em.tokenizer, QUESTION, system)
        assert positions == list(range(positions[0], len(ids)))  # up to the prompt's last token
        assert em.tokenizer.decode(ids[positions[0] :]) == "<|im_end|>\n<|im_start|>assistant\n"
        assert em.tokenizer.decode(ids[: positions[0]]).endswith(QUESTION)
        assert em.tokenizer.decode(ids) == render_prompt(em.tokenizer, QUESTION, system)
    assert template_positions(em.tokenizer, QUESTION, chat_template=False)[1] == []  # a plain prompt has none


def test_template_span_question_adds_the_question_last_token_where_question_keys_are_written(em):
    ids, template = template_positions(em.tokenizer, QUESTION)
    _, span = template_positions(em.tokenizer, QUESTION, span="question")
    assert span == [template[0] - 1, *template]
    seq = encode(em.tokenizer, QUESTION, ANSWER, "<|im_end|>", 4, key_position="question")
    assert seq.first_hook == span[0]
    assert template_positions(em.tokenizer, QUESTION, chat_template=False, span="question")[1] == []
    with pytest.raises(ValueError, match="template_span"):
        template_positions(em.tokenizer, QUESTION, span="answer")


def test_template_span_has_its_own_cached_second_moment(em):
    template, question = (template_stats(em, [2], n=4, span=s) for s in ("template", "question"))
    assert template.path != question.path
    assert question.count[2] == template.count[2] + 4  # one more position per prompt
    _, _, options = resolve_method("memit", {"template_weight": 2.0, "template_span": "question"})
    assert options["template_span"] == "question"
    _, _, options = resolve_method("memit", {"template_weight": 2.0, "template_span": "template"})
    assert "template_span" not in options  # the default leaves identities as they were


def test_template_questions_are_distinct_and_no_evaluation_prompt():
    questions = template_questions(1000)
    held_out = {json.loads(line)["question"].strip() for p in EVALUATION_PROMPTS for line in p.open()}
    assert len(set(questions)) == 1000 and not held_out & set(questions)
    assert template_questions(1000) == questions and template_questions(10) != questions[:10]  # a seeded subset


def test_template_second_moment_is_the_mean_of_k_kT_at_the_template_positions(em, monkeypatch):
    t = template_stats(em, [1, 2], n=6, system_prompt="Be brief.")
    for layer in (1, 2):
        K = torch.cat(
            [
                read_layer(em, layer, layer, torch.tensor([ids]))[0][positions]
                for ids, positions in (template_positions(em.tokenizer, q, "Be brief.") for q in template_questions(6))
            ]
        )
        assert t.count[layer] == len(K)
        torch.testing.assert_close(t.second_moment(layer), K.T @ K / len(K), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(template_keys, "template_sums", lambda *a: pytest.fail("recomputed, not cached"))
    assert template_stats(em, [1, 2], n=6, system_prompt="Be brief.").path == t.path


def test_template_weight_zero_is_todays_update_and_identity(em, stats):
    C, g = stats.second_moment(LAYER), torch.Generator().manual_seed(0)
    Ks, Kp = torch.randn(len(C), 3, generator=g), torch.randn(len(C), 5, generator=g)
    assert torch.equal(memit_solve(C, Ks, Kp, 1000.0), memit_solve(C, Ks, Kp, 1000.0, torch.float32, C, 0.0))
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=4)
    targets = [Target("r", seq, torch.randn(seq.n_windows, em.hidden_size, generator=g))]
    for backend in ("memit", "alphaedit"):
        today = compute_update(em, targets, backend, [0, 1, 2], stats=stats).factors
        zero = compute_update(em, targets, backend, [0, 1, 2], stats=stats, template_weight=0.0).factors
        assert all(torch.equal(a, b) for l in today for a, b in zip(today[l], zero[l]))
    for method in ("muke-memit", "alphaedit", "muke-unke"):
        base = resolve_method(method, {"system_prompt": None})
        assert resolve_method(method, {"template_weight": 0, "template_prompts": 50}) == base
        assert "template_weight" not in base[2] and "system_prompt" not in base[2]


def test_the_run_s_chat_settings_reach_the_backends_that_render_prompts():
    _, _, memit = resolve_method("memit", {"template_weight": 2.0, "system_prompt": "Be brief."})
    assert (memit["template_weight"], memit["system_prompt"]) == (2.0, "Be brief.")
    assert "chat_template" not in memit  # a default stays out of the identity
    _, _, unke = resolve_method("unke", {"system_prompt": "Be brief.", "chat_template": False})
    assert (unke["system_prompt"], unke["chat_template"]) == ("Be brief.", False)


@pytest.mark.parametrize("backend", ["memit", "alphaedit"])
def test_a_preserved_template_keys_output_is_left_unchanged(em, stats, backend):
    """One layer, the edit key at the question's last token: with a large template_weight the update's
    change at the template keys of C_t's prompts is ≈ 0 (< 1 % of it without), and the edit still moves
    the working memory to z."""
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=None, key_position="question")
    ids, p = torch.tensor([seq.prompt_ids]), seq.first_hook
    _, H = read_layer(em, LAYER, LAYER, ids)
    z = H[[p]].cpu() + 0.3 * torch.randn(1, em.hidden_size, generator=torch.Generator().manual_seed(0))
    targets, Kt = [Target("r", seq, z)], template_keys_of(em, template_questions(20))
    options = {"mom2_update_weight": 1e-2} if backend == "memit" else {"threshold": 1.0, "l2": 1e-6}
    change = {}
    for weight in (0.0, 1e6):
        update = compute_update(
            em, targets, backend, [LAYER], "last", stats, template_weight=weight, template_prompts=20, **options
        )
        U, V = update.factors[LAYER]
        change[weight] = (U @ (V.T @ Kt.cpu())).norm(dim=0)  # ‖ΔW k_t‖ per preserved key
        with apply(em, update):
            _, after = read_layer(em, LAYER, LAYER, ids)
        assert (z - after[[p]].cpu()).norm() < 1e-2 * (z - H[[p]].cpu()).norm()
    assert change[1e6].max() < 1e-2 * change[0.0].max(), (change[1e6].max(), change[0.0].max())


def test_unke_preservation_samples_are_rendered_with_the_run_s_chat_settings(em):
    records = load_preservation(DEFAULT_PRESERVATION)
    [default] = preservation_texts(em.tokenizer, records, 1, random.Random(0))
    [system] = preservation_texts(em.tokenizer, records, 1, random.Random(0), "Be brief.")
    [plain] = preservation_texts(em.tokenizer, records, 1, random.Random(0), chat_template=False)
    assert default.startswith("<|im_start|>user\n") and system.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>" not in plain and system.endswith(default)


def test_template_weight_enters_the_update_stages_identity_only_when_on(tmp_path, monkeypatch, request):
    import copy

    import yaml

    from muke.workflow.plan import Plan

    root = request.config.rootpath
    (tmp_path / "resources").symlink_to(root / "resources")
    monkeypatch.chdir(tmp_path)
    tiny = yaml.safe_load((root / "config" / "tiny.yaml").read_text())

    def ids(**hparams):
        config = copy.deepcopy(tiny)
        config["hparams"] = {**config.get("hparams", {}), **hparams}
        runs = Plan(config).runs
        return {(r.method, s): getattr(r, s).identity for r in runs for s in ("memories", "update") if getattr(r, s)}

    base, on = ids(), ids(template_weight=5.0)
    assert ids(template_weight=0, template_prompts=200) == base
    moved = {key for key in base if base[key] != on[key]}
    assert moved and {stage for _, stage in moved} == {"update"}
    assert {method for method, _ in moved} == {m for m, _ in base if resolve_method(m)[1] in ("memit", "alphaedit")}


def test_attach_template_computes_c_t_before_the_first_edit_only_when_asked(em, stats, monkeypatch):
    from muke.update.stats import Stats
    from muke.update.template_keys import attach_template

    fresh = Stats(stats.path, stats.meta, stats.mom2, stats.count)
    attach_template(em, fresh, {"layers": [1, 2], "template_prompts": 6})
    assert not fresh.cache  # template_weight 0: nothing to attach
    attach_template(em, fresh, {"layers": [1, 2], "template_prompts": 6, "template_weight": 3.0})
    [attached] = fresh.cache.values()
    monkeypatch.setattr(template_keys, "template_stats", lambda *a: pytest.fail("not the attached C_t"))
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=None)
    z = torch.randn(1, em.hidden_size, generator=torch.Generator().manual_seed(2))
    compute_update(em, [Target("r", seq, z)], "memit", [1, 2], "last", fresh, template_weight=3.0, template_prompts=6)
    assert list(fresh.cache.values()) == [attached]


def test_the_estimate_adds_c_t_only_when_on():
    from muke.workflow.footprint import update_cost
    from muke.workflow.widths import Widths

    smollm2 = Widths("llama", 576, 1536, 30, 49152, 9, 3, 64, True, 8192)
    for backend in ("memit", "alphaedit"):
        off = update_cost(smollm2, "float32", backend, [4, 5, 6, 7, 8], 60, 0, 0)
        on = update_cost(smollm2, "float32", backend, [4, 5, 6, 7, 8], 60, 0, 0, template=1000)
        assert update_cost(smollm2, "float32", backend, [4, 5, 6, 7, 8], 60, 0, 0, template=0) == off
        d2 = 1536**2 * 4
        assert on.cpu - off.cpu == 6 * d2 and on.device >= off.device and on.host >= off.host and on.flops > off.flops
