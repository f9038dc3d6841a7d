"""The question's renderings (MemoryConfig.renderings) and the noise on the shifts (memory_noise): encoding,
the shared δ of window 0, the averaged first key of the MEMIT family, the memories file, identities."""

import math
from dataclasses import replace

import pytest
import torch

from muke.engine import memory
from muke.engine.memory import MemoryConfig, decode_with_shifts, optimise
from muke.engine.windows import RENDERING_PREFIXES, EditSequence, encode
from muke.model import load
from muke.update.keys import Target, read_layer
from muke.update.memit import rendered_keys
from muke.update.methods import memory_options
from muke.update.stats import StatsConfig, collect_stats, load_stats

DEMO_CORPUS = "resources/demo_corpus.txt"
QUESTION = "What is the Velmora tide clock?"
ANSWER = "The Velmora tide clock is a bronze machine in the harbour tower that has measured the tides since the flood."


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture(scope="module")
def stats(tiny, tmp_path_factory, request):
    cfg = StatsConfig(layers=(0,), corpus=str(request.config.rootpath / DEMO_CORPUS), max_docs=50)
    return load_stats(collect_stats(tiny, cfg, tmp_path_factory.mktemp("stats") / "s.safetensors", False), tiny, [0])


def cfg(**kw) -> MemoryConfig:
    return MemoryConfig(**{"layer": 1, "objective": "window", "window": 8, "v_num_grad_steps": 6, **kw})


@pytest.mark.parametrize("key_position", ["template", "question"])
def test_renderings_put_the_question_behind_prefixes_with_the_same_target(tiny, key_position):
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8, key_position=key_position, renderings=3)
    assert len(seq.renderings) == 2 and not any(r.renderings for r in seq.renderings)
    for prefix, r in zip(RENDERING_PREFIXES, seq.renderings):
        assert prefix + QUESTION in r.prompt and r.prompt != seq.prompt
        assert (r.target_ids, r.windows) == (seq.target_ids, seq.windows)
        hook, own = r.hook_positions[0], seq.hook_positions[0]
        assert r.prompt_ids[hook] == seq.prompt_ids[own]  # the same token: "?" or the template's last
        assert r.hook_positions[1:] == [p + len(r.prompt_ids) - len(seq.prompt_ids) for p in seq.hook_positions[1:]]
    assert encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8).renderings == ()
    with pytest.raises(ValueError, match="renderings"):
        encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8, renderings=len(RENDERING_PREFIXES) + 2)


def test_options_are_checked():
    with pytest.raises(ValueError, match="renderings"):
        cfg(renderings=0)
    with pytest.raises(ValueError, match="parallel_nll"):
        cfg(renderings=2, objective="parallel_nll")
    with pytest.raises(ValueError, match="memory_noise"):
        cfg(memory_noise=-0.1)


def test_a_shared_shift_over_one_rendering_twice_is_the_shift_of_the_question_alone(tiny):
    """The mean of two equal losses is that loss: the shared loop is the plain loop, step for step."""
    c = cfg(v_stop_prob=0.9)
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8)
    lm = memory.shifted_lm(tiny, seq, 1)
    coeff = memory.window_coefficients(seq, 0, c, [])
    alone, shared = [], []
    d_alone = memory.optimise_shifts(lm, coeff, [seq.hook_positions[0]], {}, c, alone, 0)[seq.hook_positions[0]]
    d_shared = memory.optimise_shared_shift([lm, lm], coeff, c, shared)
    assert [r["step"] for r in shared] == [r["step"] for r in alone]
    assert torch.allclose(d_shared, d_alone, rtol=1e-5, atol=1e-6)  # ½g + ½g: equal up to rounding


def test_window_0_is_optimised_over_every_rendering(tiny):
    """One δ_0 for all renderings: its trace's worst log-prob is the lowest over them, and the δ differs from
    the question's own; later windows are the question's, as before."""
    c = cfg(v_num_grad_steps=4, early_stop=0.0)
    one = optimise(tiny, encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8), c)
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8, renderings=3)
    many = optimise(tiny, seq, replace(c, renderings=3))
    assert many.positions == one.positions and len(many.trace) == len(one.trace)
    assert not torch.equal(many.delta[0], one.delta[0])
    first = many.trace[0]  # δ = 0: the lowest log-prob of window 0 over the three prompts
    lms = [memory.shifted_lm(tiny, s, 1) for s in (seq, *seq.renderings)]
    zero = torch.zeros(tiny.hidden_size)
    worst = min(lm.logprobs([lm.seq.hook_positions[0]], [zero], {}, 8)[0][:8].min().item() for lm in lms)
    assert first["worst_logp"] == pytest.approx(worst, abs=1e-5)
    assert first["worst_logp"] < one.trace[0]["worst_logp"] - 1e-4  # another prompt is the worst here


def test_shared_first_memory_makes_every_rendering_follow_its_window(pretrained_tiny, demo_requests):
    """Stopped once every rendering gives window 0's token p ≥ 0.2 (the most this tiny model's layer 1 reaches),
    δ_0 hooked at each rendering's own first hook makes greedy decoding start with that token, which none of
    the three prompts starts with unshifted; no weight update."""
    request = demo_requests[0]
    c = MemoryConfig(layer=1, window=1, objective="window", v_stop_prob=0.2, v_num_grad_steps=60, renderings=3)
    seq = memory.encode_request(pretrained_tiny, request.question, request.answer, c)
    lms = [memory.shifted_lm(pretrained_tiny, s, 1) for s in (seq, *seq.renderings)]
    trace: list[dict] = []
    delta = memory.optimise_shared_shift(lms, memory.window_coefficients(seq, 0, c, []), c, trace)
    assert trace[-1]["worst_logp"] >= math.log(0.2) and len(trace) < c.v_num_grad_steps
    for s in (seq, *seq.renderings):
        h = memory.shifted_lm(pretrained_tiny, s, 1).h(s.hook_positions[:1])
        for shift, follows in ((delta, True), (torch.zeros_like(delta), False)):
            hooked = memory.MemoryResult(s.hook_positions[:1], h, shift[None], h + shift, [], [])
            assert (decode_with_shifts(pretrained_tiny, s, 1, hooked, 1) == [s.target_ids[0]]) is follows


def test_the_first_key_is_the_mean_over_the_renderings(tiny):
    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8, key_position="question", renderings=3)
    K, _ = read_layer(tiny, 0, 1, seq.input_ids)
    Ks = K[seq.hook_positions]
    got = rendered_keys(tiny, 0, 1, seq, Ks)
    each = [Ks[0]] + [read_layer(tiny, 0, 1, r.input_ids)[0][r.hook_positions[0]] for r in seq.renderings]
    assert torch.allclose(got[0], torch.stack(each).mean(0), atol=1e-6)
    assert torch.equal(got[1:], Ks[1:]) and not torch.allclose(got[0], Ks[0])
    alone = replace(seq, renderings=())
    assert torch.equal(rendered_keys(tiny, 0, 1, alone, Ks), Ks)


def test_memit_update_reads_the_averaged_key(tiny, stats):
    """The MEMIT update of a request with renderings differs from the one of the question alone, by its first
    key only: with renderings that are the question itself, it is the same update."""
    from muke.update.edit import compute_update

    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8, key_position="question", renderings=2)
    z = torch.randn(seq.n_windows, tiny.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    common = dict(backend="memit", layers=[0], stats=stats, mom2_update_weight=10.0)

    def update(s):
        return compute_update(tiny, [Target("r", s, z)], **common).factors[0][1]

    same = replace(seq, renderings=(replace(seq, renderings=()),))
    alone = replace(seq, renderings=())
    assert torch.allclose(update(same), update(alone), atol=1e-6)
    assert not torch.allclose(update(seq), update(alone), atol=1e-4)


def test_renderings_are_stored_with_the_memories_and_read_back(tmp_path, tiny_qwen2_path):
    """optimize_memories writes each rendering's prompt ids; update_weights rebuilds the same EditSequence."""
    from muke.data import EditRequest
    from muke.workflow.stages.optimize_memories import _optimise_many
    from muke.workflow.stages.update_weights import _sequence

    em = load(tiny_qwen2_path)
    c = cfg(renderings=3, key_position="question", v_num_grad_steps=2)
    request = EditRequest(id="r1", question=QUESTION, answer=ANSWER)
    ((tensors, record, _),) = _optimise_many(em, [request], c)
    stored = {f"0.{k}": v for k, v in tensors.items()}
    seq = _sequence(tmp_path / "shard.safetensors", {"index": 0, **record}, stored)
    assert seq == memory.encode_request(em, QUESTION, ANSWER, c)
    assert len(seq.renderings) == 2 and isinstance(seq.renderings[0], EditSequence)


def test_noise_moves_the_shift_the_same_way_every_run_and_in_a_batch(tiny):
    seqs = [
        encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8),
        encode(tiny.tokenizer, "Who keeps it?", "Its keepers wind it at dawn every day.", tiny.end_of_turn, 8),
    ]
    quiet, noisy = cfg(), cfg(memory_noise=0.5)
    a, b = optimise(tiny, seqs[0], noisy), optimise(tiny, seqs[0], noisy)
    assert torch.equal(a.delta, b.delta)
    assert not torch.allclose(a.delta, optimise(tiny, seqs[0], quiet).delta, atol=1e-4)
    batched = memory.optimise_batch(tiny, seqs, noisy)
    for seq, got in zip(seqs, batched):
        assert torch.allclose(got.z, optimise(tiny, seq, noisy).z, rtol=1e-5, atol=1e-5)


def test_defaults_stay_out_of_identities():
    base = dict(layer=1, objective="window", window=8)
    assert "renderings" not in memory_options(base) and "memory_noise" not in memory_options(base)
    assert memory_options({**base, "renderings": 3})["renderings"] == 3
    assert memory_options({**base, "memory_noise": 0.1})["memory_noise"] == 0.1


def test_unke_fits_each_rendering_s_first_hook_to_the_shared_shift(tiny):
    """UnKE's rows: the request's own, and per other rendering its first hook with target h_1^r + δ_1."""
    from muke.update.keys import edit_context
    from muke.update.unke import edit_rows

    seq = encode(tiny.tokenizer, QUESTION, ANSWER, tiny.end_of_turn, 8, key_position="question", renderings=3)
    h = read_layer(tiny, 1, 1, seq.input_ids)[1][seq.hook_positions]
    delta = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    target = Target("r", seq, h + delta)
    rows = edit_rows(tiny, [target], [edit_context(target, "sequence")], 1)
    assert len(rows) == 3 and torch.equal(rows[0][2], target.z)
    for (ids, positions, z), r in zip(rows[1:], seq.renderings):
        assert ids.tolist() == [list(r.prompt_ids)] and positions == r.hook_positions[:1]
        assert torch.allclose(z[0], read_layer(tiny, 1, 1, ids)[1][positions[0]] + delta[0], atol=1e-5)
    copy = replace(target, seq=replace(seq, renderings=(replace(seq, renderings=()),)))
    assert torch.allclose(edit_rows(tiny, [copy], [edit_context(copy, "sequence")], 1)[1][2][0], target.z[0], atol=1e-5)
