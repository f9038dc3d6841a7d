"""The δ engine: windows, coefficients, affinity λ, the δ loop, fast path, hooked decoding."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from muke.engine import affinity, hooks, memory
from muke.engine.affinity import figure_gradients, initial_figure_gradients
from muke.engine.forward import CachedShiftedLM, PlainShiftedLM
from muke.engine.memory import MemoryConfig, decode_with_shifts, optimise, optimise_request
from muke.engine.objectives import affinity_lambdas, figure_coefficients, token_coefficients
from muke.engine.windows import EditSequence, encode, split_windows
from muke.model import EditableModel, load
from muke.numerics import NumericalError

QUESTION = "What is the Velmora tide clock?"
ANSWER = (
    "The Velmora tide clock is a bronze machine in the harbour tower that has measured the tides "
    "since the winter of the great flood, and its keepers still wind it every morning at dawn."
)


def synthetic_sequence(n_target: int, window: int, n_prompt: int = 5) -> EditSequence:
    return EditSequence("p", tuple(range(n_prompt)), tuple(range(100, 100 + n_target)), split_windows(n_target, window))


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_path) -> EditableModel:
    return load(tiny_qwen2_path)


def cfg(**kw) -> MemoryConfig:
    base = dict(layer=1, objective="matryoshka", window=8, v_num_grad_steps=6)
    return MemoryConfig(**{**base, **kw})


# ---- windows and hook positions (docs/ALGORITHM.md §2) ----


def test_windows_cover_target_without_overlap():
    assert split_windows(45, 20) == ((0, 20), (20, 40), (40, 45))
    assert split_windows(7, None) == ((0, 7),)
    with pytest.raises(ValueError):
        split_windows(0, 5)


def test_hook_positions_sit_on_token_before_each_window():
    seq = synthetic_sequence(n_target=25, window=10, n_prompt=6)
    assert seq.hook_positions == [5, 15, 25]
    # input = prompt ++ target[:-1]; target token t is predicted at len(prompt) - 1 + t
    assert seq.input_ids.shape == (1, 6 + 25 - 1)
    assert seq.target_positions[0] == 5 and seq.target_positions[-1] == 29
    assert seq.input_ids[0, seq.target_positions[1:]].tolist() == list(seq.target_ids[:-1])


def test_encode_appends_end_of_turn_and_uses_chat_template(tiny):
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, window=8)
    assert seq.prompt.startswith("<|im_start|>user\n") and seq.prompt.endswith("<|im_start|>assistant\n")
    assert seq.target_ids[-1] == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny.tokenizer.decode(seq.target_ids[:-1]) == ANSWER


# ---- token coefficients (docs/ALGORITHM.md §3) ----


def test_matryoshka_vanilla_coefficients_are_nested_figure_counts():
    seq = synthetic_sequence(n_target=50, window=10)  # N = 5 windows
    n = seq.n_windows
    for i in range(n):
        c = token_coefficients("matryoshka_vanilla", seq, i)
        n_tok = 50 - 10 * i
        assert c[: 10 * i].abs().sum() == 0
        for k in range(i, n):  # paper: (N-k+1)/(N-i+1), 1-based
            expected = (n - k) / (n - i) / n_tok
            assert torch.allclose(c[10 * k : 10 * (k + 1)], torch.full((10,), expected))


def test_matryoshka_coefficients_weight_figures_by_lambda():
    seq = synthetic_sequence(n_target=30, window=10)
    lam = torch.tensor([1.0, 1.5, 0.5])
    c = token_coefficients("matryoshka", seq, 0, lam)
    # window 0 is in all three figures, window 1 in the last two, window 2 in the last one
    assert torch.allclose(c[:10], torch.full((10,), 3.0 / 3 / 30))
    assert torch.allclose(c[10:20], torch.full((10,), 2.0 / 3 / 30))
    assert torch.allclose(c[20:], torch.full((10,), 0.5 / 3 / 30))


def test_other_objectives_coefficients():
    seq = synthetic_sequence(n_target=25, window=10)
    assert torch.allclose(token_coefficients("window", seq, 1)[10:20], torch.full((10,), 0.1))
    assert token_coefficients("window", seq, 1).sum().item() == pytest.approx(1.0)
    c = token_coefficients("sequential_nll", seq, 1)
    assert c[:10].sum() == 0 and torch.allclose(c[10:], torch.full((15,), 1 / 15))
    assert figure_coefficients(seq, 1).shape == (2, 25)


def test_lambda_orders():
    aff = torch.tensor([0.99, 0.3, -0.2])
    assert affinity_lambdas(aff.clone(), "paper").tolist() == pytest.approx([1.0, 1.7, 2.2])
    assert affinity_lambdas(aff.clone(), "reference").tolist() == pytest.approx([2.2, 1.7, 1.0])


# ---- affinity λ against brute force (one backward per figure) ----


def brute_force_affinity(em, seq, i, layer, lr, steps):
    position = seq.hook_positions[i]
    ids = seq.input_ids
    targets = torch.tensor(seq.target_ids)
    start = len(seq.prompt_ids) - 1

    def figure_loss(delta, j):
        with hooks.shifts(em.layer(layer), [position], [delta]):
            logits = em.model(input_ids=ids).logits[0, start:]
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        a, b = seq.windows[i][0], seq.windows[j][1]
        return nll[a:b].mean()

    delta = torch.zeros(em.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    cosines = []
    for _ in range(steps):
        g_first = torch.autograd.grad(figure_loss(delta, i), delta)[0]
        row = []
        for j in range(i, seq.n_windows):
            g = torch.autograd.grad(figure_loss(delta, j), delta)[0]
            row.append(torch.nn.functional.cosine_similarity(g_first, g, dim=0))
        cosines.append(torch.stack(row))
        opt.zero_grad()
        figure_loss(delta, i).backward()
        opt.step()
    aff = torch.stack(cosines).mean(0)
    return aff


@pytest.mark.parametrize("order", ["paper", "reference"])
@pytest.mark.parametrize("fast", [True, False])
def test_engine_lambda_equals_brute_force(tiny, order, fast):
    c = cfg(lambda_order=order, fast=fast, window=10, v_num_grad_steps=2)
    seq, result = optimise_request(tiny, QUESTION, ANSWER, c)
    assert seq.n_windows >= 3
    for i in range(seq.n_windows - 1):
        aff = brute_force_affinity(tiny, seq, i, c.layer, c.v_lr, c.affinity_steps)
        assert torch.allclose(torch.tensor(result.affinities[i]), aff, atol=1e-4)
        lam = 2 - aff
        lam[0] = 1.0
        expected = lam.flip(0) if order == "reference" else lam
        assert torch.allclose(torch.tensor(result.lambdas[i]), expected, atol=1e-4)
    assert result.lambdas[-1] == [1.0]


# ---- the δ loop (docs/ALGORITHM.md §4) ----


@pytest.mark.parametrize(
    "objective", ["one_for_all", "window", "sequential_nll", "parallel_nll", "matryoshka_vanilla", "matryoshka"]
)
def test_fast_path_equals_straightforward(tiny, objective):
    fast = optimise_request(tiny, QUESTION, ANSWER, cfg(objective=objective, fast=True))[1]
    slow = optimise_request(tiny, QUESTION, ANSWER, cfg(objective=objective, fast=False))[1]
    assert len(fast.trace) == len(slow.trace)
    for a, b in zip(fast.trace, slow.trace):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert torch.allclose(fast.z, slow.z, rtol=1e-5, atol=1e-5)


BATCH = [
    ("What is the Velmora tide clock?", ANSWER),
    ("Who built the harbour tower?", "Masons from the northern quarries built it over nine summers."),
    (
        "Why do the keepers wind the clock at dawn, and who pays them for it?",
        "Tradition: the first keeper did so, and the town council pays the keepers from the harbour dues.",
    ),
]


@pytest.mark.parametrize(
    "objective,early_stop,stop_prob",
    [("matryoshka", 1e-2, None), ("window", 1e-2, None), ("sequential_nll", 3.0, None), ("window", 1e-2, 0.5)],
)
def test_batched_requests_equal_one_by_one(tiny, objective, early_stop, stop_prob):
    """Requests of different prompt and target lengths (so different window counts), optimised in one batch:
    each request's trace, λ and z equal its own run. early_stop 3.0 makes requests leave the batch at
    different steps; v_stop_prob runs the batched stop rule (the random model never reaches it)."""
    c = cfg(objective=objective, early_stop=early_stop, v_stop_prob=stop_prob)
    window = None if objective == "one_for_all" else c.window
    seqs = [encode(tiny.tokenizer, q, a, tiny.end_of_turn, window) for q, a in BATCH]
    assert len({s.n_windows for s in seqs}) > 1 and len({len(s.prompt_ids) for s in seqs}) > 1
    assert memory.can_batch(tiny, c)
    batched = memory.optimise_batch(tiny, seqs, c)
    for seq, got in zip(seqs, batched):
        alone = optimise(tiny, seq, c)
        assert [(r["window"], r["step"]) for r in got.trace] == [(r["window"], r["step"]) for r in alone.trace]
        for a, b in zip(got.trace, alone.trace):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert got.lambdas == alone.lambdas  # λ: each request alone, the same code
        assert got.positions == alone.positions
        assert torch.allclose(got.z, alone.z, rtol=1e-5, atol=1e-5)
    if early_stop == 3.0:
        assert len({len(r.trace) for r in batched}) > 1  # they did leave at different steps


def test_batched_request_with_non_finite_loss_fails_alone(tiny, monkeypatch):
    c = cfg(objective="window")
    seqs = [encode(tiny.tokenizer, q, a, tiny.end_of_turn, c.window) for q, a in BATCH]
    real = memory.batched_logprobs

    def poisoned(lms, *args):
        out = real(lms, *args)
        return [lp * float("nan") if lm.seq is seqs[1] else lp for lm, lp in zip(lms, out)]

    monkeypatch.setattr(memory, "batched_logprobs", poisoned)
    got = memory.optimise_batch(tiny, seqs, c)
    assert isinstance(got[1], NumericalError) and "window 0" in str(got[1])
    monkeypatch.undo()
    for k in (0, 2):
        assert torch.allclose(got[k].z, optimise(tiny, seqs[k], c).z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_chunk", [64, 4])
def test_shared_figure_gradients_equal_one_backward_per_figure(tiny, monkeypatch, min_chunk):
    """The fast path's figure gradients (from the LM head's input, in chunks of windows, all windows at
    δ = 0 at once) are the gradients themselves, not only their directions (which the affinity cosines
    would hide). min_chunk 4: every window its own chunk; 64: one chunk."""
    monkeypatch.setattr(affinity, "MIN_CHUNK", min_chunk)
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8)
    fast, slow = CachedShiftedLM(tiny, seq, 1), PlainShiftedLM(tiny, seq, 1)
    chunks = fast.target_states([seq.hook_positions[0]], [torch.zeros(tiny.hidden_size)], affinity.chunk_cuts(seq, 0))
    assert len(chunks) == (1 if min_chunk == 64 else seq.n_windows)
    at_zero = initial_figure_gradients(fast)
    torch.manual_seed(0)
    for i in range(seq.n_windows - 1):
        zero = torch.zeros(tiny.hidden_size)
        assert torch.allclose(at_zero[i], figure_gradients(slow, i, zero, shared=False), rtol=1e-4, atol=1e-7)
        delta = 0.3 * torch.randn(tiny.hidden_size)
        expected = figure_gradients(slow, i, delta, shared=False)
        assert torch.allclose(figure_gradients(fast, i, delta, shared=True), expected, rtol=1e-4, atol=1e-7)


def test_head_logits_are_the_models_logits(tiny):
    ids = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8).input_ids
    with torch.no_grad(), hooks.capture(tiny.final_norm, "output") as seen:
        logits = tiny.model(input_ids=ids).logits
    assert torch.allclose(tiny.head_logits(seen[0]), logits, atol=1e-6)


def test_result_shapes_and_z_is_h_plus_delta(tiny):
    seq, r = optimise_request(tiny, QUESTION, ANSWER, cfg())
    n, d = seq.n_windows, tiny.hidden_size
    assert r.positions == seq.hook_positions
    assert r.h.shape == r.delta.shape == r.z.shape == (n, d)
    assert torch.equal(r.z, r.h + r.delta)
    assert [len(lam) for lam in r.lambdas] == [n - i for i in range(n)]
    # h is the unshifted output of layer l_WM at the hook positions
    with torch.no_grad(), hooks.capture(tiny.layer(1), "output") as seen:
        tiny.model(input_ids=seq.input_ids)
    assert torch.allclose(r.h, seen[0][0, r.positions], atol=1e-6)


def test_one_for_all_uses_single_shift_at_last_prompt_token(tiny):
    seq, r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="one_for_all"))
    assert seq.n_windows == 1 and r.positions == [len(seq.prompt_ids) - 1]


def test_parallel_nll_moves_all_shifts_jointly(tiny):
    seq, r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="parallel_nll"))
    assert {row["window"] for row in r.trace} == {-1}  # one joint loop
    assert len(r.trace) == 6  # not one loop per window
    assert all(r.delta[i].norm() > 0 for i in range(seq.n_windows))


def test_sequential_objectives_loop_per_window_with_earlier_shifts_frozen(tiny):
    seq, r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="window"))
    assert sorted({row["window"] for row in r.trace}) == list(range(seq.n_windows))
    # the last window's loss at step 0 is computed with every earlier δ applied
    lm = CachedShiftedLM(tiny, seq, 1)
    last = seq.n_windows - 1
    coeff = token_coefficients("window", seq, last)
    lp = lm.logprobs(
        [r.positions[last]], [torch.zeros(tiny.hidden_size)], dict(zip(r.positions[:last], r.delta[:last]))
    )[0]
    step0 = next(row for row in r.trace if row["window"] == last and row["step"] == 0)
    assert (-(coeff * lp).sum()).item() == pytest.approx(step0["loss"], rel=1e-5)


def test_at_most_steps_minus_one_updates(tiny):
    r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="one_for_all", v_num_grad_steps=1))[1]
    assert len(r.trace) == 1 and r.delta.abs().sum() == 0
    r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="one_for_all", v_num_grad_steps=4))[1]
    assert [row["step"] for row in r.trace] == [0, 1, 2, 3]
    assert r.trace[-1]["delta_norm"] > 0


def test_early_stop_ends_the_loop_before_any_update(tiny):
    r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="window", early_stop=1e3))[1]
    assert all(row["step"] == 0 for row in r.trace)
    assert r.delta.abs().sum() == 0


def test_worst_logp_is_the_lowest_target_logprob_of_the_window(tiny):
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, window=8)
    r = optimise(tiny, seq, cfg(objective="window"))
    with torch.no_grad():
        logits = tiny.model(input_ids=seq.input_ids).logits[0, seq.target_positions]  # (n_target, vocab)
    lp = logits.log_softmax(-1).gather(-1, torch.tensor(seq.target_ids)[:, None])[:, 0]
    first = r.trace[0]  # window 0, step 0: δ = 0, no earlier shift
    start, end = seq.windows[0]
    assert first["worst_logp"] == pytest.approx(lp[start:end].min().item(), abs=1e-5)
    assert lp.min() < lp[start:end].min() - 0.1  # so the check above tells the window from the whole target


def test_stop_prob_ends_each_window_once_greedy_follows_it(pretrained_tiny, demo_requests):
    """v_stop_prob 0.5: each one-token window's loop stops at its first step where the token has p ≥ 0.5
    (so it is the argmax), most of them well before the step cap; greedy decoding with the shifts then gives
    back the whole target, in a third of the steps the authors' loss rule takes (170 vs 528)."""
    request = demo_requests[0]
    answer = " ".join(request.answer.split()[:20])
    stop = MemoryConfig(layer=1, window=1, objective="window", v_stop_prob=0.5)
    seq, r = optimise_request(pretrained_tiny, request.question, answer, stop)
    windows: dict[int, list[dict]] = {}
    for row in r.trace:
        windows.setdefault(row["window"], []).append(row)
    threshold = math.log(0.5)
    for rows in windows.values():
        assert all(row["worst_logp"] < threshold and row["loss"] >= stop.early_stop for row in rows[:-1])
        assert rows[-1]["worst_logp"] >= threshold or len(rows) == stop.v_num_grad_steps  # the rule, or the cap
    by_rule = [rows for rows in windows.values() if len(rows) < stop.v_num_grad_steps]
    assert len(by_rule) > 0.75 * len(windows)  # 21 of 24 on this model; a token below 0.5 may still be the argmax
    assert decode_with_shifts(pretrained_tiny, seq, 1, r) == list(seq.target_ids)
    authors = optimise_request(pretrained_tiny, request.question, answer, replace(stop, v_stop_prob=None))[1]
    assert len(r.trace) < len(authors.trace)


def test_stop_prob_must_be_a_probability():
    with pytest.raises(ValueError, match="v_stop_prob"):
        cfg(v_stop_prob=1.0)


def test_weight_decay_term_is_norm_over_squared_h_norm(tiny):
    r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="one_for_all", v_weight_decay=0.5))[1]
    row = r.trace[2]
    assert row["weight_decay"] == pytest.approx(0.5 * row["delta_norm"] / row["h_norm"] ** 2, rel=1e-5)
    assert row["loss"] == pytest.approx(row["nll"] + row["weight_decay"], rel=1e-6)


def test_clamp_bounds_shift_norm(tiny):
    r = optimise_request(tiny, QUESTION, ANSWER, cfg(objective="window", clamp_norm_factor=0.05))[1]
    norms, h_norms = r.delta.norm(dim=-1), r.h.norm(dim=-1)
    assert torch.all(norms <= 0.05 * h_norms * (1 + 1e-5))
    assert torch.allclose(norms, 0.05 * h_norms, rtol=1e-4)  # the clamp binds at lr 0.5


def test_non_finite_loss_is_a_numerical_error(tiny):
    broken = EditableModel(copy.deepcopy(tiny.model), tiny.tokenizer)
    with torch.no_grad():
        broken.down_proj(3).weight[0, 0] = float("nan")
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, window=8)
    with pytest.raises(NumericalError, match="window 0, step 0: loss is not finite"):
        optimise(broken, seq, cfg(objective="window"))


def test_shift_hooks_accept_tensor_and_tuple_outputs():
    class Layer(torch.nn.Module):
        def __init__(self, as_tuple):
            super().__init__()
            self.as_tuple = as_tuple

        def forward(self, x):
            return (x, None) if self.as_tuple else x

    x = torch.zeros(2, 4, 3)
    d = torch.ones(3)
    for as_tuple in (False, True):
        layer = Layer(as_tuple)
        with hooks.shifts(layer, [2], [d]):
            out = layer(x)
        h = hooks.hidden_of(out)
        assert isinstance(out, tuple) == as_tuple
        assert h[:, 2].eq(1).all() and h[:, [0, 1, 3]].eq(0).all()


# ---- hooked δ reproduce long targets by greedy decoding (pretrained tiny model) ----


@pytest.mark.parametrize(
    "objective, n_requests", [("window", 3), ("matryoshka", 1), pytest.param("matryoshka", 3, marks=pytest.mark.slow)]
)
def test_hooked_shifts_reproduce_long_demo_targets(pretrained_tiny, one_token_memories, objective, n_requests):
    """δ hooked at l_WM, no weight update: greedy decoding must give back ≥ 60-token targets exactly.

    A 4-layer model cannot carry a window of many tokens through one shift (see the closing notes), so
    windows of one token are used: each δ then sits exactly where its token is predicted, which makes
    this an exact test of windows, hook positions, the objective and decoding with shifts. (μKE with
    one-token windows costs ~1 min per request here: three requests run with the slow tests.)
    """
    em = pretrained_tiny
    for i in range(n_requests):
        request, seq, r = one_token_memories(objective, i)
        target = list(seq.target_ids)
        assert len(target) >= 60
        no_shift = r.__class__([], r.h[:0], r.delta[:0], r.z[:0], [], [])
        before, after = decode_with_shifts(em, seq, 1, no_shift), decode_with_shifts(em, seq, 1, r)
        print(request.id, objective, "pre-edit exact:", before == target, "post-edit exact:", after == target)
        assert before != target
        assert after == target
