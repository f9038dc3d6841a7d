"""Weight updates: the MEMIT / AlphaEdit solves, UnKE's block fit, exact revert, export, end to end."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from muke.data import EditRequest
from muke.engine.windows import encode
from muke.eval.generate import greedy
from muke.model import ModelError, load
from muke.update.alphaedit import alphaedit_solve, null_space_projector
from muke.update.edit import compute_update, edit, target_nll
from muke.update.keys import Target, read_layer
from muke.update.memit import low_rank_update, memit_solve
from muke.update.methods import resolve_method
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.unke import unke_update
from muke.update.weights import WeightUpdate, apply, export_edited

DEMO_CORPUS = "resources/demo_corpus.txt"
QUESTION = "What is the city of Velmora known for?"
ANSWER = "Velmora is a port city famous for its Copper Bridge."
UNRELATED_Q = "Give three tips for staying healthy."
UNRELATED_A = "Eat a balanced diet with plenty of vegetables, fruit and whole grains. Stay active every day."
# small settings for a 4-layer random model (d_ff 344: mom2_update_weight scaled down from 15000)
TINY_PRESET = dict(
    layers=[0, 1, 2],
    unke_layers=[1],
    window=2,
    anyedit_window=4,
    v_num_grad_steps=12,
    mom2_update_weight=1000.0,
    unke_steps=30,
    n_preserve=5,
)


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture(scope="module")
def stats(em, tmp_path_factory, request):
    root = request.config.rootpath
    cfg = StatsConfig(layers=(0, 1, 2), corpus=str(root / DEMO_CORPUS), max_docs=150)
    path = collect_stats(em, cfg, tmp_path_factory.mktemp("stats") / "s.safetensors", progress=False)
    return load_stats(path, em, [0, 1, 2])


def random_spd(n, generator, low=1e-3, high=1.0, n_low=None):
    """Q diag(λ) Qᵀ with n_low eigenvalues `low` and the rest `high`; returns (C, Q, λ)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    n_low = n // 2 if n_low is None else n_low
    lam = torch.cat([torch.full((n_low,), low), torch.full((n - n_low,), high)]).double()
    return (Q * lam) @ Q.T, Q, lam


# ---- the solves (docs/ALGORITHM.md §5) ----


def test_memit_solve_equals_lstsq_of_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    d_ff, n, m = 40, 3, 12
    C, _, _ = random_spd(d_ff, g, low=0.05)
    Ks, Kp = torch.randn(d_ff, n, generator=g), torch.randn(d_ff, m, generator=g)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-6)):  # result is fp32
        A = memit_solve(C, Ks, Kp, mom2_update_weight=15.0, dtype=dtype)
        M = 15.0 * C + Kp.double() @ Kp.double().T + Ks.double() @ Ks.double().T
        expected = torch.linalg.lstsq(M, Ks.double()).solution
        assert A.shape == (d_ff, n)
        torch.testing.assert_close(A.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    # no preserved keys (plain MEMIT): Kp has zero columns
    A = memit_solve(C, Ks, Kp[:, :0], 15.0, torch.float64)
    expected = torch.linalg.lstsq(15.0 * C + Ks.double() @ Ks.double().T, Ks.double()).solution
    torch.testing.assert_close(A.double(), expected, rtol=1e-6, atol=1e-8)


def test_alphaedit_leaves_keys_in_the_preserved_subspace_unchanged():
    g = torch.Generator().manual_seed(1)
    d_ff, d_model, n = 48, 16, 4
    C, Q, lam = random_spd(d_ff, g, low=1e-3, high=2.0)
    P = null_space_projector(C.float(), threshold=2e-2)
    Q0 = Q[:, lam < 2e-2]
    torch.testing.assert_close(P.double(), Q0 @ Q0.T, rtol=0, atol=1e-5)

    Ks, Kp = torch.randn(d_ff, n, generator=g), torch.randn(d_ff, 10, generator=g)
    R = torch.randn(d_model, n, generator=g)
    V = alphaedit_solve(P, Ks, Kp, l2=10.0)
    dW = R @ V.T  # ΔW = R Vᵀ: (d_model, d_ff)
    k0 = (Q[:, lam >= 2e-2] @ torch.randn(int((lam >= 2e-2).sum()), 5, generator=g, dtype=torch.float64)).float()
    rel = (dW @ k0).norm() / (dW.norm() * k0.norm())
    assert rel < 1e-4, rel
    k_null = (Q0 @ torch.randn(Q0.shape[1], 5, generator=g, dtype=torch.float64)).float()
    assert (dW @ k_null).norm() / (dW.norm() * k_null.norm()) > 1e-2  # it does edit somewhere


# ---- UnKE ----


def test_unke_lowers_its_edit_loss_and_keeps_preservation_loss_small(em):
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=4)
    _, H = read_layer(em, 1, 1, seq.input_ids)
    g = torch.Generator().manual_seed(0)
    z = H[seq.hook_positions].cpu() + 0.5 * torch.randn(seq.n_windows, em.hidden_size, generator=g)
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    diffs, trace = unke_update(em, [Target("r", seq, z)], layers=[1], lr=1e-3, steps=20, n_preserve=4)
    first, last = trace[0], trace[-1]
    print(
        f"\nunke loss edit {first['edit']:.3e} -> {last['edit']:.3e}, preserve {first['preserve']:.1e} -> {last['preserve']:.1e}"
    )
    assert first["preserve"] == 0.0 and last["edit"] < 0.2 * first["edit"]
    assert last["preserve"] < 0.2 * first["edit"]
    assert set(diffs) == {f"model.layers.1.{n}" for n, _ in em.layer(1).named_parameters()}
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())  # model untouched


def test_unke_bf16_deltas_are_half_the_file(em, tmp_path):
    """unke_delta_dtype bfloat16: parameter changes stored in bf16 (half the bytes); the first layer's are
    the fp32 ones up to bf16 rounding."""
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=4)
    _, H = read_layer(em, 2, 2, seq.input_ids)
    z = H[seq.hook_positions].cpu() + torch.randn(
        seq.n_windows, em.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    kw = dict(layers=[1, 2], lr=1e-3, steps=3, n_preserve=2)
    full, _ = unke_update(em, [Target("r", seq, z)], **kw)
    half, _ = unke_update(em, [Target("r", seq, z)], delta_dtype="bfloat16", **kw)
    assert all(d.dtype == torch.bfloat16 for d in half.values()) and half.keys() == full.keys()
    for name, d in full.items():
        if name.startswith("model.layers.1.") and d.norm() > 0:
            assert (half[name].float() - d).norm() <= 4e-3 * d.norm(), name  # bf16: 8 significant bits
    sizes = [
        WeightUpdate("muke-unke", "unke", [1, 2], ["r"], params=p).save(tmp_path / f"{k}.safetensors").stat().st_size
        for k, p in (("fp32", full), ("bf16", half))
    ]
    assert sizes[1] < 0.51 * sizes[0]


# ---- the update ΔW: apply / revert / save / export ----


def random_update(em, g) -> WeightUpdate:
    d_ff = em.down_proj_weight(0).shape[1]
    factors = {
        l: (torch.randn(em.hidden_size, 2, generator=g), torch.randn(d_ff, 2, generator=g) * 0.1) for l in (0, 2)
    }
    params = {
        f"model.layers.1.{n}": torch.randn(p.shape, generator=g) * 0.01 for n, p in em.layer(1).named_parameters()
    }
    return WeightUpdate("test", "mixed", [0, 1, 2], ["a", "b"], factors, params, {"note": "random"})


def test_apply_reverts_every_parameter_bit_exactly(em):
    update = random_update(em, torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = em.model(input_ids=ids).logits
    with apply(em, update):
        changed = {n for n, p in em.model.named_parameters() if not torch.equal(p, before[n])}
        assert not torch.allclose(em.model(input_ids=ids).logits, logits)
        torch.testing.assert_close(
            em.down_proj_weight(2) - before["model.layers.2.mlp.down_proj.weight"],
            update.dense(2),
            rtol=1e-4,
            atol=1e-5,
        )
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"} | set(
        update.params
    )
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    with pytest.raises(RuntimeError, match="inside"):
        with apply(em, [update, update]):
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())


def test_update_save_load_roundtrip_and_refusal(em, tmp_path, tiny_llama_path):
    update = random_update(em, torch.Generator().manual_seed(1))
    loaded = WeightUpdate.load(update.save(tmp_path / "d.safetensors"))
    assert (loaded.method, loaded.backend, loaded.layers, loaded.request_ids, loaded.info) == (
        update.method,
        update.backend,
        update.layers,
        update.request_ids,
        update.info,
    )
    assert all(torch.equal(a, b) for l in update.factors for a, b in zip(update.factors[l], loaded.factors[l]))
    assert all(torch.equal(update.params[n], loaded.params[n]) for n in update.params)
    llama = load(tiny_llama_path)
    wide = WeightUpdate("t", "memit", [0], [], {0: (torch.zeros(64, 1), torch.zeros(344, 1))})
    with pytest.raises(ModelError, match="another model"):
        with apply(llama, wide):
            pass


def test_export_loads_with_plain_transformers(tiny_llama_path, tmp_path):
    em = load(tiny_llama_path)  # tied embeddings
    update = random_update(em, torch.Generator().manual_seed(2))
    out = export_edited(em, [update], tmp_path / "edited")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with apply(em, update):
        expected = em.model(input_ids=ids).logits
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert (out / "muke_edit.json").exists() and (out / "tokenizer.json").exists()


# ---- method registry ----


@pytest.mark.parametrize(
    "name, objective, backend, keys, layer, window, early_stop",
    [
        ("muke-memit", "matryoshka", "memit", "sequence", 8, 20, 1e-2),
        ("muke-unke", "matryoshka", "unke", "sequence", 7, 20, 5e-3),
        ("anyedit-memit", "window", "memit", "sequence", 8, 50, 1e-2),
        ("anyedit-unke", "window", "unke", "sequence", 7, 50, 5e-3),
        ("memit", "one_for_all", "memit", "last", 8, 20, 1e-2),
        ("alphaedit", "one_for_all", "alphaedit", "last", 8, 20, 1e-2),
        ("unke", "one_for_all", "unke", "last", 7, 20, 5e-3),
        ("sequential_nll+memit", "sequential_nll", "memit", "sequence", 8, 20, 1e-2),
    ],
)
def test_resolve_method(name, objective, backend, keys, layer, window, early_stop):
    memory, got_backend, options = resolve_method(name, {"v_num_grad_steps": 5, "unke_steps": 70, "irrelevant": 1})
    assert (memory["objective"], got_backend, options["keys"]) == (objective, backend, keys)
    assert (memory["layer"], memory["window"], memory["early_stop"]) == (layer, window, early_stop)
    assert memory["v_num_grad_steps"] == 5
    assert options["layers"] == ([7] if backend == "unke" else [4, 5, 6, 7, 8])
    assert ("steps" in options) == (backend == "unke")


def test_resolve_method_rejects_unknown_names():
    for bad in ("rome", "matryoshka+lora", "nope+memit"):
        with pytest.raises(ValueError, match="unknown method"):
            resolve_method(bad, {})
    _, _, options = resolve_method("unke", {"unke_layer": 5})
    assert options["layers"] == [5]


# ---- MEMIT reaches its targets ----


@pytest.mark.parametrize("backend", ["memit", "alphaedit"])
def test_single_layer_update_moves_working_memory_to_z(em, stats, backend):
    """keys='last', one layer = l_WM, almost no regularisation: the residual at l_WM becomes z."""
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=None)
    ids, p = torch.tensor([seq.prompt_ids]), len(seq.prompt_ids) - 1
    _, H = read_layer(em, 2, 2, ids)
    z = H[[p]].cpu() + 0.3 * torch.randn(1, em.hidden_size, generator=torch.Generator().manual_seed(0))
    options = {"mom2_update_weight": 1e-4} if backend == "memit" else {"l2": 1e-6, "threshold": 1e9}
    update = compute_update(em, [Target("r", seq, z)], backend, [2], keys="last", stats=stats, **options)
    assert update.factors[2][0].shape == (em.hidden_size, 1)
    with apply(em, update):
        _, H_after = read_layer(em, 2, 2, ids)
    gap_before, gap_after = (z - H[[p]].cpu()).norm(), (z - H_after[[p]].cpu()).norm()
    assert gap_after < 1e-2 * gap_before, (gap_before, gap_after)


@pytest.mark.parametrize("backend", ["memit", "alphaedit"])
def test_streamed_statistics_equal_the_resident_solve(em, stats, backend):
    """C (and AlphaEdit's P) stay on the host and stream to the device per layer: the factors equal those
    of the original formulas with every layer's C / P resident (within 1e-6), a second update reusing
    the host-cached P is bit-identical, and nothing derived from the statistics is kept off the host."""
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, window=4)
    z = torch.randn(seq.n_windows, em.hidden_size, generator=torch.Generator().manual_seed(1))
    targets, layers = [Target("r", seq, z)], [0, 1, 2]
    resident = {l: stats.mom2[l].to(em.device) / stats.count[l] for l in layers}
    P = {l: null_space_projector(resident[l]) for l in layers}

    def resident_solve(layer, Ks, Kp):
        if backend == "memit":
            return torch.linalg.solve(1000.0 * resident[layer] + Kp @ Kp.T + Ks @ Ks.T, Ks)
        M = P[layer] @ (Ks @ Ks.T + Kp @ Kp.T) + 10.0 * torch.eye(len(Ks), device=Ks.device)
        return torch.linalg.solve(M, P[layer] @ Ks)

    options = {"mom2_update_weight": 1000.0} if backend == "memit" else {}
    streamed = compute_update(em, targets, backend, layers, stats=stats, **options).factors
    again = compute_update(em, targets, backend, layers, stats=stats, **options).factors
    reference = low_rank_update(em, targets, layers, "sequence", resident_solve)
    for l in layers:
        assert torch.equal(streamed[l][1], again[l][1])
        torch.testing.assert_close(streamed[l][0], reference[l][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(streamed[l][1], reference[l][1], rtol=1e-6, atol=1e-6)
    assert all(t.device.type == "cpu" for t in stats.cache.values())


# ---- end to end on a tiny model ----


def next_token_logprobs(em, seq):
    """log p(· | prefix) at every target position: (len(target), vocab)."""
    with torch.no_grad():
        logits = em.model(input_ids=seq.input_ids).logits[0, len(seq.prompt_ids) - 1 :]
    return logits.float().log_softmax(-1)


def kl(p, q):
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("method", ["muke-memit", "muke-unke"])
def test_end_to_end_edit_lowers_target_nll_and_stays_local(em, stats, method):
    request = EditRequest("velmora", QUESTION, ANSWER)
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, None)
    unrelated = encode(em.tokenizer, UNRELATED_Q, UNRELATED_A, em.end_of_turn, None)
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    nll_before, p_edit, p_unrel = target_nll(em, seq), next_token_logprobs(em, seq), next_token_logprobs(em, unrelated)

    update, results = edit(em, [request], method, TINY_PRESET, stats)
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    with apply(em, update):
        nll_after = target_nll(em, seq)
        kl_edit, kl_unrel = kl(p_edit, next_token_logprobs(em, seq)), kl(p_unrel, next_token_logprobs(em, unrelated))
    print(
        f"\n{method}: target NLL {nll_before:.3f} -> {nll_after:.3f}; KL edited {kl_edit:.4f}, "
        f"unrelated {kl_unrel:.5f}; {update.info['seconds']:.1f} s update, {update.info['memory_seconds']:.1f} s δ"
    )
    assert nll_after < nll_before - 0.5
    assert kl_unrel < 0.5 * kl_edit
    windows = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, TINY_PRESET["window"]).n_windows
    assert update.request_ids == ["velmora"] and len(results[0].positions) == windows > 1
    assert all(U.shape[1] == V.shape[1] == windows for U, V in update.factors.values())  # rank ≤ n keys


@pytest.fixture(scope="module")
def pretrained_stats(pretrained_tiny, tmp_path_factory, request):
    cfg = StatsConfig(layers=(1,), corpus=str(request.config.rootpath / DEMO_CORPUS))
    path = collect_stats(pretrained_tiny, cfg, tmp_path_factory.mktemp("stats") / "p.safetensors", progress=False)
    return load_stats(path, pretrained_tiny, [1])


# MEMIT writes 66 one-token memories into one 344-wide layer of a 4-layer model: the weight that still
# reproduces the target (10; 100 does not) cannot protect an unrelated prompt much (measured KL 1.95 vs
# 2.71; with 1000, 0.28 vs 1.42 but no exact answer). UnKE's preservation term does (0.08 vs 2.75).
@pytest.mark.parametrize(
    "backend, options, kl_ratio",
    [
        ("memit", {"mom2_update_weight": 10.0}, 0.8),
        ("unke", {"lr": 5e-3, "steps": 50, "n_preserve": 20}, 0.1),
    ],
)
def test_update_makes_greedy_generation_reproduce_a_demo_target(
    pretrained_tiny, one_token_memories, pretrained_stats, backend, options, kl_ratio
):
    """μKE memories (one-token windows, l_WM = 1, see test_engine) written into the weights of layer 1:
    the edited model's greedy answer is the ≥ 60-token target, while an unrelated prompt's next-token
    distribution moves less than the edited one's."""
    em = pretrained_tiny
    request, seq, memories = one_token_memories("matryoshka", 0)
    unrelated = encode(em.tokenizer, UNRELATED_Q, UNRELATED_A, em.end_of_turn, None)
    p_edit, p_unrel = next_token_logprobs(em, seq), next_token_logprobs(em, unrelated)
    target = em.tokenizer.decode(seq.target_ids, skip_special_tokens=True).strip()
    assert greedy(em, [request.question], max_new_tokens=len(seq.target_ids) + 8)[0].text != target

    update = compute_update(em, [Target(request.id, seq, memories.z)], backend, [1], stats=pretrained_stats, **options)
    with apply(em, update):
        answer = greedy(em, [request.question], max_new_tokens=len(seq.target_ids) + 8)[0].text
        kl_edit, kl_unrel = kl(p_edit, next_token_logprobs(em, seq)), kl(p_unrel, next_token_logprobs(em, unrelated))
    print(
        f"\nmuke+{backend}: {len(seq.target_ids)}-token target reproduced: {answer == target}; "
        f"KL edited {kl_edit:.3f}, unrelated {kl_unrel:.4f}"
    )
    assert answer == target
    assert kl_unrel < kl_ratio * kl_edit
