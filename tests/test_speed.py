"""Savings in the δ engine that keep the algorithm: each must leave the target memories z as they were."""

import contextlib

import pytest
import torch

from muke.engine import batched, forward, memory
from muke.engine.logprob import target_logprobs
from muke.engine.memory import MemoryConfig, optimise_request
from muke.engine.windows import encode
from muke.model import load

QUESTION = "What is the Velmora tide clock?"
ANSWER = (
    "The Velmora tide clock is a bronze machine in the harbour tower that has measured the tides "
    "since the winter of the great flood, and its keepers still wind it every morning at dawn."
)


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_path):
    return load(tiny_qwen2_path)


def reference_logprobs(logits, targets):
    """The formula the engine used before the fused function: log_softmax, then gather."""
    return logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]


def test_fused_target_logprobs_are_log_softmax_and_gather():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 50, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 50, (2, 7))
    assert torch.autograd.gradcheck(lambda x: target_logprobs(x, y), (x,))
    assert torch.allclose(target_logprobs(x, y), reference_logprobs(x, y).double(), atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        a = x.detach().to(dtype).requires_grad_(True)
        b = x.detach().to(dtype).requires_grad_(True)
        weights = torch.randn(2, 7)
        (weights * target_logprobs(a, y)).sum().backward()
        (weights * reference_logprobs(b, y)).sum().backward()
        assert target_logprobs(a, y).dtype == torch.float32 and a.grad.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol)


@pytest.mark.parametrize("objective", ["matryoshka", "window"])
def test_fused_logprobs_leave_memories_as_they_were(tiny, monkeypatch, objective):
    """z, λ and the loss trace of a request, single and batched, with the engine's log-probs fused and as
    they were computed before (log_softmax + gather)."""
    cfg = MemoryConfig(layer=1, objective=objective, window=8, v_num_grad_steps=6)
    seqs = [encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8)]
    seqs.append(encode(tiny.tokenizer, "Who built it?", "Masons from the northern quarries.", tiny.end_of_turn, 8))
    fused = [optimise_request(tiny, QUESTION, ANSWER, cfg)[1], *memory.optimise_batch(tiny, seqs, cfg)]
    monkeypatch.setattr(forward, "target_logprobs", reference_logprobs)
    monkeypatch.setattr(batched, "target_logprobs", reference_logprobs)
    before = [optimise_request(tiny, QUESTION, ANSWER, cfg)[1], *memory.optimise_batch(tiny, seqs, cfg)]
    for a, b in zip(fused, before):
        assert [r["step"] for r in a.trace] == [r["step"] for r in b.trace]
        assert [r["loss"] for r in a.trace] == pytest.approx([r["loss"] for r in b.trace], rel=1e-6)
        assert sum(a.lambdas, []) == pytest.approx(sum(b.lambdas, []), abs=1e-6)
        assert torch.allclose(a.z, b.z, rtol=1e-6, atol=1e-6)


def test_autocast_keeps_h_and_delta_fp32_and_z_close(tiny):
    """bf16 autocast: the matrix products of the δ passes in bf16; h (read outside, in the model's dtype) is
    the fp32 run's exactly, δ and z stay fp32 and near the fp32 ones."""
    base = dict(layer=1, window=8, v_num_grad_steps=6)
    full = optimise_request(tiny, QUESTION, ANSWER, MemoryConfig(**base))[1]
    half = optimise_request(tiny, QUESTION, ANSWER, MemoryConfig(**base, autocast="bfloat16"))[1]
    assert torch.equal(half.h, full.h)
    assert half.delta.dtype == half.z.dtype == torch.float32
    assert not torch.equal(half.delta, full.delta)  # the products did run in bf16
    assert ((half.z - full.z).norm(dim=-1) / full.z.norm(dim=-1)).max() < 5e-2
    with pytest.raises(ValueError, match="autocast"):
        MemoryConfig(layer=1, autocast="float8")


def test_weights_cast_once_give_autocast_numbers_and_are_put_back(tiny, monkeypatch):
    """`precision` casts the upper layers' and the head's weights once per request: the same z as autocast
    casting them at every call, and the model's own fp32 (tied) parameters are back afterwards."""
    cfg = MemoryConfig(layer=1, window=8, v_num_grad_steps=6, autocast="bfloat16")
    before = {name: p for name, p in tiny.model.named_parameters()}
    once = optimise_request(tiny, QUESTION, ANSWER, cfg)[1]
    assert {name: p for name, p in tiny.model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for p in before.values())
    monkeypatch.setattr(memory, "lower_precision_weights", lambda modules, dtype: contextlib.nullcontext())
    every_call = optimise_request(tiny, QUESTION, ANSWER, cfg)[1]
    assert torch.equal(once.z, every_call.z)


def test_delta_batch_size_fills_the_memory_budget(tiny):
    from muke.engine import batch_size

    seqs = [encode(tiny.tokenizer, q, a, tiny.end_of_turn, 8) for q, a in [(QUESTION, ANSWER), ("Who?", "Masons.")] * 3]
    largest = max(batch_size.step_bytes(tiny, s, 1, 4) for s in seqs)
    assert largest > batch_size.step_bytes(tiny, seqs[1], 1, 4) > 0
    for room, expected in [(3, 3), (0.2, 1), (100, len(seqs))]:
        assert batch_size.delta_batch_size(tiny, seqs, 1, budget_gib=room * largest / batch_size.GIB) == expected
    assert batch_size.step_bytes(tiny, seqs[0], 1, 2) < largest  # bf16 autocast: half the activations
    # ... and the bf16 copies of the upper layers' and the head's weights come off the budget first
    copies = batch_size.cast_weight_bytes(tiny, 1)
    upper = [tiny.layer(i) for i in range(2, tiny.n_layers)] + [tiny.lm_head]
    assert copies == 2 * sum(m.weight.numel() for u in upper for m in u.modules() if isinstance(m, torch.nn.Linear)) > 0
    half = batch_size.step_bytes(tiny, seqs[0], 1, 2)
    budget = (copies + 2 * half) / batch_size.GIB
    assert batch_size.delta_batch_size(tiny, seqs, 1, autocast=True, budget_gib=budget) == 2
    with pytest.raises(ValueError, match="delta_memory_gib"):
        batch_size.delta_batch_size(tiny, seqs, 1, budget_gib=0)


def _edit_auto(em, requests, stats):
    from muke.update.edit import edit

    preset = {"layers": [1], "window": 8, "v_num_grad_steps": 4}
    return edit(em, requests, "muke-memit", preset, stats)


def test_auto_batches_ignore_the_free_memory(tiny, tmp_path, monkeypatch):
    """delta_batch_size auto (`muke edit`'s and the workflow's default): the same requests give the same
    batches, hence bit for bit the same memories and ΔW, with plenty of memory free and beside a ballast
    with (as the host and the GPU report it) almost nothing free."""
    import os

    from muke.data import RESOURCES, EditRequest
    from muke.engine.memory import MemoryConfig
    from muke.update.memories import delta_batch
    from muke.update.stats import StatsConfig, collect_stats, load_stats

    requests = [EditRequest(f"r{i}", q, a) for i, (q, a) in enumerate([(QUESTION, ANSWER), ("Who?", "Masons.")] * 2)]
    cfg = StatsConfig(layers=(1,), corpus=str(RESOURCES / "demo_corpus.txt"), max_docs=16)
    stats = load_stats(collect_stats(tiny, cfg, tmp_path / "stats.safetensors", progress=False), tiny, [1])
    first = _edit_auto(tiny, requests, stats)
    sizes = [delta_batch(tiny, requests, MemoryConfig(layer=1, window=8), "auto")]

    ballast = torch.ones(1 << 27)  # 512 MiB, touched
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1 << 20, 1 << 30))
    second = _edit_auto(tiny, requests, stats)
    sizes.append(delta_batch(tiny, requests, MemoryConfig(layer=1, window=8), "auto"))
    del ballast

    assert sizes == [len(requests)] * 2  # the tiny model's four requests fit the default budget together
    (u1, r1), (u2, r2) = first, second
    for a, b in zip(r1, r2):
        assert torch.equal(a.z, b.z) and torch.equal(a.delta, b.delta)
    for layer in u1.factors:
        assert torch.equal(u1.dense(layer), u2.dense(layer))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fp32_attention_wraps_the_models_own_attention(tiny_qwen2_path, monkeypatch, attention):
    """`fp32_attention` runs the model's own attention (mask included: a shifted suffix on a cached prefix
    gives the same log-probs bit for bit) with fp32 q, k, v under bf16 autocast, and puts it back after."""
    from muke.engine import attention as attention_module

    em = load(tiny_qwen2_path)
    em.model.set_attn_implementation(attention)
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 8)
    free, delta = [seq.hook_positions[1]], [torch.randn(em.hidden_size, generator=torch.Generator().manual_seed(0))]
    plain = forward.shifted_lm(em, seq, 1).logprobs(free, delta)
    with attention_module.fp32_attention(em.model):
        assert em.model.config._attn_implementation == f"fp32-{attention}"
        assert torch.equal(forward.shifted_lm(em, seq, 1).logprobs(free, delta), plain)
    assert em.model.config._attn_implementation == attention

    if attention != "sdpa":
        return
    # what the kernel runs in: autocast on (it casts q, k, v to bf16 itself), or off with q, k, v all fp32
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, k, v, *a, **kw: seen.append((torch.is_autocast_enabled("cpu"), v.dtype)) or sdpa(q, k, v, *a, **kw),
    )
    runs = {}
    for upcast in (True, False):
        seen.clear()
        cfg = MemoryConfig(layer=1, window=8, v_num_grad_steps=2, autocast="bfloat16", fp32_attention=upcast)
        optimise_request(em, QUESTION, ANSWER, cfg)
        runs[upcast] = list(seen)
    assert set(runs[True]) == {(False, torch.float32)}
    assert any(on for on, _ in runs[False]) and len(runs[False]) == len(runs[True])  # h's own pass: autocast off
