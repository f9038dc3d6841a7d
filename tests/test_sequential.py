"""Sequential editing (muke.update.sequential): each batch on the model the earlier batches left, the chain
of updates reproduces the final model, exact revert, resume, AlphaEdit's preservation of earlier edits."""

import pytest
import torch

from muke.data import EditRequest
from muke.model import load
from muke.update.alphaedit import without_keys
from muke.update.backends import BACKENDS
from muke.update.edit import compute_update, edit
from muke.update.sequential import SequentialEditor, batches_of, edit_sequence
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.weights import WeightUpdate, apply, chain_sum, touched

DEMO_CORPUS = "resources/demo_corpus.txt"
REQUESTS = [
    EditRequest("velmora", "What is Velmora known for?", "Velmora is famous for its Copper Bridge."),
    EditRequest("orlan", "Who founded Orlan?", "Orlan was founded by Mira Tessel in 1820."),
    EditRequest("kest", "Where is Kest?", "Kest lies on the northern shore of Lake Amber."),
]
PRESET = dict(
    layers=[0, 1, 2],
    unke_layers=[1],
    window=4,
    v_num_grad_steps=6,
    mom2_update_weight=1000.0,
    unke_steps=10,
    n_preserve=3,
)
METHODS = ["muke-memit", "matryoshka+alphaedit", "muke-unke"]


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture(scope="module")
def stats(em, tmp_path_factory, request):
    cfg = StatsConfig(layers=(0, 1, 2), corpus=str(request.config.rootpath / DEMO_CORPUS), max_docs=150)
    path = collect_stats(em, cfg, tmp_path_factory.mktemp("stats") / "s.safetensors", progress=False)
    return load_stats(path, em, [0, 1, 2])


@pytest.fixture(scope="module")
def preset(stats):
    """PRESET with an AlphaEdit null space of half of each layer's key space (the tiny model's C has few
    eigenvalues below the default threshold)."""
    eigenvalues = torch.linalg.eigvalsh(stats.second_moment(2, "cpu").double())
    return {**PRESET, "null_space_threshold": eigenvalues.median().item()}


def weights(em):
    return {n: p.detach().clone() for n, p in em.model.named_parameters()}


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def same_factors(a: WeightUpdate, b: WeightUpdate) -> bool:
    return a.factors.keys() == b.factors.keys() and all(
        torch.equal(x, y) for layer in a.factors for x, y in zip(a.factors[layer], b.factors[layer])
    )


@pytest.fixture(scope="module")
def chains(em, stats, preset):
    """{method: (chain, weights after batch 0, weights after batch 1)} of editing REQUESTS[:2] in turn."""
    out = {}
    for method in METHODS:
        seen = []
        chain = edit_sequence(
            em,
            batches_of(REQUESTS[:2], 1),
            method,
            preset,
            stats,
            on_batch=lambda t, u, r, seen=seen: seen.append(weights(em)),
        )
        out[method] = (chain, *seen)
    return out


def test_each_backend_declares_what_its_updates_change(em, chains):
    """Backend.changes / factored / edit_keys (muke.update.backends) are what its updates in a sequence hold."""
    for chain, *_ in chains.values():
        update, b = chain[0], BACKENDS[chain[0].backend]
        assert {id(p) for p in touched(em, update)} == {id(p) for p in b.changes(em, update.layers)}
        assert (bool(update.factors), bool(update.params), bool(update.keys)) == (
            b.factored,
            not b.factored,
            b.edit_keys,
        )


def test_batches_of():
    assert batches_of([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="≥ 1"):
        batches_of([1], 0)


@pytest.mark.parametrize("method", METHODS)
def test_sequence_equals_its_chain_applied_by_hand_and_reverts_bit_exactly(em, chains, method):
    original = weights(em)
    chain, after0, after1 = chains[method]
    assert same(weights(em), original)  # edit_sequence restored the model
    assert [u.request_ids for u in chain] == [["velmora"], ["orlan"]]
    assert not same(after0, original) and not same(after1, after0)
    with apply(em, chain[:1]):
        assert same(weights(em), after0)
    with apply(em, chain):
        assert same(weights(em), after1)
    assert same(weights(em), original)


@pytest.mark.parametrize("method", METHODS)
def test_the_second_batch_is_computed_on_the_first_batchs_weights(em, stats, preset, chains, method):
    chain = chains[method][0]
    keys = {layer: K for layer, K in chain[0].keys.items()} if method == "matryoshka+alphaedit" else None
    with apply(em, chain[0]):
        on_first, _ = edit(em, [REQUESTS[1]], method, preset, stats, edited_keys=keys)
    on_original, _ = edit(em, [REQUESTS[1]], method, preset, stats, edited_keys=keys and {})

    def tensors(u):
        return [t for U, V in u.factors.values() for t in (U, V)] + list(u.params.values())

    assert all(torch.equal(a, b) for a, b in zip(tensors(chain[1]), tensors(on_first)))
    assert not all(torch.equal(a, b) for a, b in zip(tensors(chain[1]), tensors(on_original)))


def test_alphaedit_later_updates_leave_earlier_edit_keys_outputs_unchanged(em, stats, preset, chains):
    chain, after0, _ = chains["matryoshka+alphaedit"]
    first, second = chain
    assert set(first.keys) == set(second.keys) == {0, 1, 2}
    for layer, K in first.keys.items():  # K: (d_ff, n) the first edit's keys, read on its weights
        W = after0[f"model.layers.{layer}.mlp.down_proj.weight"]
        change = (second.dense(layer) @ K).norm() / (W @ K).norm()
        assert change < 1e-4, (layer, change)
    # without the earlier keys in the projection the same update moves them (the check can fail)
    with apply(em, first):
        plain, _ = edit(em, [REQUESTS[1]], "matryoshka+alphaedit", preset, stats)
    moved = max(
        (plain.dense(layer) @ K).norm() / (after0[f"model.layers.{layer}.mlp.down_proj.weight"] @ K).norm()
        for layer, K in first.keys.items()
    )
    assert moved > 1e-3


@pytest.mark.parametrize("method", ["muke-memit", "matryoshka+alphaedit"])
def test_resume_from_the_saved_chain_equals_the_uninterrupted_sequence(em, stats, preset, chains, method, tmp_path):
    chain = chains[method][0]
    saved = WeightUpdate.load(chain[0].save(tmp_path / "0000.safetensors"))
    with SequentialEditor(em, method, preset, stats) as editor:
        editor.replay(saved)
        second, _ = editor.edit([REQUESTS[1]])
    for layer, (U, V) in chain[1].factors.items():
        assert torch.equal(second.factors[layer][0], U) and torch.equal(second.factors[layer][1], V)


@pytest.mark.parametrize("method", METHODS)
def test_chain_sum_is_the_chain_up_to_rounding_at_the_size_of_one_link(em, chains, method):
    chain, _, after1 = chains[method]
    total = chain_sum(chain)
    assert total.request_ids == ["velmora", "orlan"] and total.info["links"] == 2
    assert set(total.params) == set(chain[0].params)  # UnKE: one block's differences, not two
    for layer, (U, V) in total.factors.items():
        assert U.shape[1] == V.shape[1] == sum(u.factors[layer][0].shape[1] for u in chain)
    with apply(em, total):
        for name, p in em.model.named_parameters():
            torch.testing.assert_close(p, after1[name], rtol=1e-5, atol=1e-6)


def test_replay_refuses_an_update_of_another_method(em, stats, preset, chains):
    with (
        SequentialEditor(em, "muke-memit", preset, stats) as editor,
        pytest.raises(ValueError, match="does not belong"),
    ):
        editor.replay(chains["muke-unke"][0][0])


def test_without_keys_projects_onto_the_null_space_orthogonal_to_the_keys():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    P = (Q[:, :12] @ Q[:, :12].T).float()  # a rank-12 projector
    K = torch.randn(30, 4, generator=g)
    Pt = without_keys(P, K)
    assert (Pt @ K).abs().max() < 1e-5
    torch.testing.assert_close(Pt @ Pt, Pt, atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ Pt, Pt, atol=1e-5, rtol=0)  # inside range(P)
    assert round(torch.trace(Pt).item()) == 8
    assert torch.equal(without_keys(P, K[:, :0]), P)


# ---------------------------------------------------------------------------- keeping the earlier edits


def test_preserve_earlier_memit_moves_the_first_edits_outputs_less(em, stats, preset, chains):
    """preserve_earlier: the first batch's keys join the second solve's Kp; ΔW_2 k_1 shrinks."""
    chain = edit_sequence(em, batches_of(REQUESTS[:2], 1), "muke-memit", preset, stats, preserve_earlier=True)
    first, second = chain
    assert set(first.keys) == set(second.keys) == {0, 1, 2}
    plain = chains["muke-memit"][0][1]
    assert same_factors(first, chains["muke-memit"][0][0])  # nothing to preserve before batch 2
    for layer, K in first.keys.items():
        kept, moved = (second.dense(layer) @ K).norm(), (plain.dense(layer) @ K).norm()
        assert kept < 0.8 * moved, (layer, kept, moved)  # 0.65-0.74 on the tiny model


def test_preserve_earlier_resumes_from_the_keys_in_the_saved_update(em, stats, preset, tmp_path):
    chain = edit_sequence(em, batches_of(REQUESTS[:2], 1), "muke-memit", preset, stats, preserve_earlier=True)
    saved = WeightUpdate.load(chain[0].save(tmp_path / "0000.safetensors"))
    with SequentialEditor(em, "muke-memit", preset, stats, preserve_earlier=True) as editor:
        editor.replay(saved)
        second, _ = editor.edit([REQUESTS[1]])
    assert same_factors(second, chain[1])


def test_weight_growth_solves_batch_t_with_the_grown_weight(em, stats, preset, chains):
    """Batch 1 (one edit before it) of a sequence with growth g is the update at w·(1 + g) on batch 0's model;
    growth 0 is today's sequence, bit for bit."""
    g, w = 2.5, preset["mom2_update_weight"]
    grown = edit_sequence(em, batches_of(REQUESTS[:2], 1), "muke-memit", preset, stats, weight_growth=g)
    unchanged = edit_sequence(em, batches_of(REQUESTS[:2], 1), "muke-memit", preset, stats, weight_growth=0.0)
    today = chains["muke-memit"][0]
    with apply(em, grown[0]):
        single, _ = edit(em, [REQUESTS[1]], "muke-memit", {**preset, "mom2_update_weight": w * (1 + g)}, stats)
    assert grown[1].info["mom2_update_weight"] == w * (1 + g) and grown[0].info["mom2_update_weight"] == w
    assert same_factors(grown[1], single) and same_factors(grown[0], today[0]) and not same_factors(grown[1], today[1])
    assert all(same_factors(a, b) for a, b in zip(unchanged, today))
    timing = ("seconds", "memory_seconds")
    assert [{k: v for k, v in u.info.items() if k not in timing} for u in unchanged] == [
        {k: v for k, v in u.info.items() if k not in timing} for u in today
    ]


def down_projections_of(em):
    """The edited layers' down-projections."""
    return {
        f"model.layers.{layer}.mlp.down_proj.weight": em.down_proj(layer).weight.detach().clone()
        for layer in PRESET["layers"]
    }


@pytest.mark.parametrize("method", ["muke-memit", "matryoshka+alphaedit"])
def test_resolve_every_re_solves_on_the_original_weights_and_the_chain_replays_bit_for_bit(em, stats, preset, method):
    """resolve_every 2: batch 1's link takes the down-projections to W_0 + ΔW(every target so far, on W_0);
    batch 2 is an ordinary update on that model; the chain replays the final model and W_0 comes back."""
    original, seen = weights(em), []
    with SequentialEditor(em, method, preset, stats, resolve_every=2) as editor:
        chain = [editor.edit([r])[0] for r in REQUESTS[:2]]
        seen.append(weights(em))
        chain.append(editor.edit([REQUESTS[2]])[0])
        seen.append(weights(em))
        targets, backend, options = editor.targets[:2], editor.backend, editor.options
        keys = {layer: K.clone() for layer, K in (editor.edited_keys or {}).items()}
    assert same(weights(em), original)
    _, resolved, last = chain
    assert resolved.info["resolved"] and resolved.request_ids == ["orlan"] and not resolved.factors
    assert set(resolved.params) == set(down_projections_of(em)) and "resolved" not in last.info
    assert all(d.dtype == torch.float32 for d in resolved.params.values())
    one_shot = compute_update(em, targets, backend, stats=stats, **options)
    with apply(em, one_shot):
        expected = down_projections_of(em)
    for name, W in expected.items():
        torch.testing.assert_close(seen[0][name], W, rtol=1e-5, atol=1e-6)
    for n, state in ((2, seen[0]), (3, seen[1])):
        with apply(em, chain[:n]):
            assert same(weights(em), state)
    assert same(weights(em), original)
    if method == "matryoshka+alphaedit":  # the earlier edits' keys keep accumulating across the re-solve
        assert all(K.shape[1] == sum(u.keys[layer].shape[1] for u in chain) for layer, K in keys.items())


def test_resolve_every_resumes_from_the_saved_chain_and_targets(em, stats, preset, tmp_path):
    with SequentialEditor(em, "muke-memit", preset, stats, resolve_every=2) as editor:
        whole = [editor.edit([r]) for r in REQUESTS[:2]]
    saved = WeightUpdate.load(whole[0][0].save(tmp_path / "0000.safetensors"))
    with SequentialEditor(em, "muke-memit", preset, stats, resolve_every=2) as editor:
        with pytest.raises(ValueError, match="resolve_every: the update of"):
            editor.replay(saved)
        editor.replay(saved, editor.targets_of([REQUESTS[0]], [r.z for r in whole[0][1]]))
        resolved, _ = editor.edit([REQUESTS[1]])
    assert resolved.info["resolved"] and resolved.params.keys() == whole[1][0].params.keys()
    assert all(torch.equal(d, whole[1][0].params[name]) for name, d in resolved.params.items())


@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("muke-unke", {"preserve_earlier": True}, "preserve_earlier: backend 'unke' has no edit keys"),
        ("ft", {"preserve_earlier": True}, "preserve_earlier: backend 'ft'"),
        ("lora", {"preserve_earlier": True}, "preserve_earlier: backend 'lora'"),
        ("matryoshka+alphaedit", {"weight_growth": 0.1}, "weight_growth: backend 'alphaedit'"),
        ("muke-unke", {"weight_growth": 0.1}, "weight_growth: backend 'unke'"),
        ("muke-memit", {"weight_growth": -1.0}, "weight_growth: must be ≥ 0"),
        ("muke-unke", {"resolve_every": 2}, "resolve_every: backend 'unke'"),
        ("lora", {"resolve_every": 1}, "resolve_every: backend 'lora'"),
        ("muke-memit", {"resolve_every": 0}, "resolve_every: must be ≥ 1"),
        ("muke-unke", {"recheck_earlier": True}, "recheck_earlier: backend 'unke'"),
        ("muke-memit", {"recheck_earlier": True}, r"recheck_earlier: .*edit_passes ≥ 2 \(got 1\)"),
    ],
)
def test_sequence_options_a_backend_cannot_honour_are_refused(em, method, option, message):
    with pytest.raises(ValueError, match=message):
        SequentialEditor(em, method, PRESET, **option)
    SequentialEditor(em, "matryoshka+alphaedit", PRESET, preserve_earlier=True)  # implied there: accepted
