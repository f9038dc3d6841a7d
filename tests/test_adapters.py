"""Every architecture adapter (muke.model.ADAPTERS) on a tiny model built from its config: how the down-projection's
output enters the residual stream, δ optimisation + weight update + bit-exact revert, plain prompts for a tokenizer
without a chat template (gpt2), and the MEMIT update through the post-MLP norm of Gemma 2/3 and OLMo 2."""

import copy
import dataclasses
import json
import logging

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoConfig, AutoModelForCausalLM

import muke.cli as cli
from muke.data import DEMO_CORPUS, EditRequest
from muke.engine import affinity, hooks, windows
from muke.engine.forward import CachedShiftedLM, PlainShiftedLM
from muke.engine.windows import encode
from muke.model import ADAPTERS, EditableModel, ModelError, check_architecture, load
from muke.tiny import train_tokenizer
from muke.update.edit import compute_update, edit, target_nll
from muke.update.keys import Target, read_layer
from muke.update.memit import rms_norm_preimage
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.weights import apply

QUESTION = "What is the city of Velmora known for?"
ANSWER = "Velmora is a port city famous for its Copper Bridge."
LAYERS = [0, 1]  # the MEMIT layers of the 3-layer models; l_WM = 1
PRESET = dict(
    layers=LAYERS, unke_layers=[1], window=4, v_num_grad_steps=8, mom2_update_weight=100.0, unke_steps=10, n_preserve=3
)
# 3 layers, hidden 64. initializer_range 0.1 gives MLP outputs of a real model's scale (rms ~0.4, ≫ √eps of the
# post-MLP norms); at the default 0.02 they are ~3e-3, where eps still moves a norm's output by ~10%.
DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
)
CONFIGS = {
    "llama": DECODER,
    "qwen2": {**DECODER, "tie_word_embeddings": False},
    "qwen3": {**DECODER, "head_dim": 16},
    "mistral": {**DECODER, "sliding_window": None},
    "phi3": DECODER,
    "gemma": {**DECODER, "head_dim": 16},
    "gemma2": {**DECODER, "head_dim": 16, "sliding_window": 256},
    # Gemma 3 mixes sliding-window and full-attention layers (1 in 6); here one of each below l_WM = 1 and above it
    "gemma3_text": {
        **DECODER,
        "head_dim": 16,
        "sliding_window": 256,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "olmo2": DECODER,
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=3, n_head=4, n_positions=512, initializer_range=0.1),
}
ARCHS = list(CONFIGS)
POST_NORM = ["gemma2", "gemma3_text", "olmo2"]


@pytest.fixture(scope="module")
def tokenizers():
    """The ChatML tokenizer; for gpt2 the same vocabulary without a chat template, ending with <|endoftext|>."""
    chatml = train_tokenizer(DEMO_CORPUS)
    plain = copy.deepcopy(chatml)
    plain.chat_template, plain.eos_token = None, "<|endoftext|>"
    return {"chatml": chatml, "plain": plain}


@pytest.fixture(scope="module")
def model_dir(tokenizers, tmp_path_factory):
    """model_dir(arch) → a folder with a seeded random model of that architecture and its tokenizer, built once."""
    root, built = tmp_path_factory.mktemp("adapters"), {}

    def build(arch):
        if arch not in built:
            tok = tokenizers["plain" if arch == "gpt2" else "chatml"]
            ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            config = AutoConfig.for_model(arch, bos_token_id=None, **ids, **CONFIGS[arch])
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():  # norms off their initial weights (Gemma's 0 makes the gain 1 + 0, hiding the offset)
                for name, p in model.named_parameters():
                    if "norm" in name or ".ln_" in name:
                        p.add_(0.3 * torch.randn(p.shape))
            model.save_pretrained(root / arch)
            tok.save_pretrained(root / arch)
            built[arch] = root / arch
        return built[arch]

    return build


@pytest.fixture(scope="module")
def models(model_dir):
    """models(arch) → the EditableModel, loaded once through muke.model.load (from_pretrained)."""
    loaded = {}

    def get(arch):
        if arch not in loaded:
            loaded[arch] = load(model_dir(arch))
        return loaded[arch]

    return get


@pytest.fixture(scope="module")
def stats(models, model_dir):
    """stats(arch) → second moments of LAYERS over 20 demo-corpus documents, collected once."""
    made = {}

    def get(arch):
        if arch not in made:
            em, out = models(arch), model_dir(arch).with_name(f"{arch}-stats.safetensors")
            cfg = StatsConfig(layers=tuple(LAYERS), corpus=str(DEMO_CORPUS), max_docs=20)
            made[arch] = load_stats(collect_stats(em, cfg, out, progress=False), em, LAYERS)
        return made[arch]

    return get


def shifted_output(em: EditableModel, layer: int, positions: list[int], shifts: torch.Tensor):
    """Adds shifts[k] to layer's down-projection output at positions[k] inside the block."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[0, positions] += shifts.to(output.dtype)
        return output

    return hooks.forward_hook(em.down_proj(layer), hook)


def test_every_adapter_is_tested_here():
    assert set(CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_down_proj_output_enters_the_residual_as_the_adapter_says(models, arch):
    """A shift ε of layer 1's down-projection output at one position moves the layer's output there by ε, or by
    N(o + ε) - N(o) where the adapter names a post-MLP norm N, and nowhere else: what the MEMIT update inverts."""
    em = models(arch)
    assert em.adapter is ADAPTERS[arch] and (em.post_mlp_norm(1) is not None) == (arch in POST_NORM)
    ids, p = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, None).input_ids, 5
    eps = torch.randn(1, em.hidden_size, generator=torch.Generator().manual_seed(0))
    with hooks.capture(em.down_proj(1), "output") as o:
        _, H = read_layer(em, 1, 1, ids)
    with shifted_output(em, 1, [p], eps):
        _, H_shifted = read_layer(em, 1, 1, ids)
    norm, o = em.post_mlp_norm(1), o[0][0, [p]]
    expected = eps if norm is None else norm(o + eps) - norm(o)
    torch.testing.assert_close(H_shifted[[p]] - H[[p]], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(H_shifted[:p], H[:p]) and torch.equal(H_shifted[p + 1 :], H[p + 1 :])


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_engine_equals_the_plain_one(models, monkeypatch, arch):
    """CachedShiftedLM (lower layers replayed, a KV-cache prefix, passes split in chunks) gives PlainShiftedLM's
    log-probs and LM-head inputs, also where sliding-window and full-attention layers mix (Gemma 2/3: their
    cache entries size the masks differently)."""
    monkeypatch.setattr(affinity, "MIN_CHUNK", 2)  # chunk this short target's pass at every window
    em = models(arch)
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 2)
    fast, plain = CachedShiftedLM(em, seq, 1), PlainShiftedLM(em, seq, 1)
    g = torch.Generator().manual_seed(0)
    hook = seq.hook_positions
    fixed, free, deltas = (
        {hook[0]: torch.randn(em.hidden_size, generator=g)},
        [hook[1]],
        [torch.randn(em.hidden_size, generator=g)],
    )
    torch.testing.assert_close(fast.logprobs(free, deltas, fixed), plain.logprobs(free, deltas, fixed))
    chunks = fast.target_states(free, deltas, affinity.chunk_cuts(seq, 1))
    assert len(chunks) > 2
    (whole, first), start = plain.target_states(free, deltas)[0], chunks[0][1]
    torch.testing.assert_close(torch.cat([c for c, _ in chunks], dim=1), whole[:, start - first :])


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_statistics_equal_padded_ones(models, tmp_path, arch):
    """Documents packed side by side under block-diagonal masks give the second moments of one document per row,
    also through Gemma 2/3's sliding-window and full-attention masks."""
    em = models(arch)
    moments = []
    for pack in (True, False):
        cfg = StatsConfig(layers=tuple(LAYERS), corpus=str(DEMO_CORPUS), max_docs=12, pack=pack)
        stats = load_stats(collect_stats(em, cfg, tmp_path / f"{pack}.safetensors", progress=False), em, LAYERS)
        moments.append([stats.second_moment(layer) for layer in LAYERS])
    for packed, padded in zip(*moments):
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["muke-memit", "muke-unke"])
@pytest.mark.parametrize("arch", ARCHS)
def test_edit_lowers_the_target_nll_and_reverts_bit_exactly(models, stats, arch, method):
    """δ optimisation + weight update (the `muke edit` path: update.edit.edit), applied, then reverted."""
    em = models(arch)
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, None)
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    nll_before = target_nll(em, seq)
    update, results = edit(em, [EditRequest("r", QUESTION, ANSWER)], method, PRESET, stats(arch))
    assert results[0].z.shape == (encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 4).n_windows, em.hidden_size)
    with apply(em, update):
        nll_after = target_nll(em, seq)
        assert any(not torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    assert nll_after < nll_before, (nll_before, nll_after)


def test_a_tokenizer_without_chat_template_gets_plain_prompts(models, model_dir, stats, caplog, capsys, tokenizers):
    """gpt2 has no chat template: prompts are the question itself, said once in the log, and `muke edit` runs."""
    em = models("gpt2")
    assert em.tokenizer.chat_template is None
    windows._note_plain_prompts.cache_clear()
    with caplog.at_level(logging.WARNING, logger="muke.engine.windows"):
        seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, None)
        encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, None)
    assert seq.prompt == QUESTION
    (record,) = caplog.records
    assert "no chat template" in record.getMessage() and "chat_template: false" in record.getMessage()
    chatml = tokenizers["chatml"]
    assert windows.uses_chat_template(chatml) and not windows.uses_chat_template(chatml, chat_template=False)

    args = ["--question", QUESTION, "--answer", ANSWER, "--stats", str(stats("gpt2").path), "--layers", "0", "1"]
    args += ["--window", "4", "--v-steps", "8", "--mom2-update-weight", "100", "--max-new-tokens", "4", "--json"]
    assert cli.main(["edit", "--model", str(model_dir("gpt2")), "--method", "muke-memit", *args]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["nll_post"] < row["nll_pre"]


def test_a_plain_prompt_opens_with_bos_where_the_tokenizer_adds_one(tokenizers):
    """Prompts are tokenized without special tokens, so a plain prompt writes out the <bos> that the tokenizer's
    own encoding starts with (Gemma 3 answers a prompt without it with <eos>); gpt2-like tokenizers add none."""
    plain = tokenizers["plain"]
    assert windows.plain_prompt(plain, QUESTION) == QUESTION
    gemma_like = copy.deepcopy(plain)
    gemma_like.bos_token = "<|im_start|>"
    bos = ("<|im_start|>", gemma_like.bos_token_id)  # the backend adds it, as Gemma's tokenizer.json does
    gemma_like.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[bos])
    seq = encode(gemma_like, QUESTION, ANSWER, gemma_like.eos_token, None)
    assert seq.prompt == "<|im_start|>" + QUESTION
    assert seq.prompt_ids == tuple(gemma_like(QUESTION)["input_ids"]) and seq.prompt_ids[0] == gemma_like.bos_token_id


def test_rms_norm_preimage_inverts_the_norm_or_finds_its_nearest_output():
    """N(preimage(y)) = y for y that N produces; otherwise N(preimage(y)) is the nearest output of N at like's
    scale: y - ŷ = μ ŷ / a² with a² + μ ≥ 0 (the optimality conditions of min ‖a ⊙ v - y‖, mean(v²) = 1)."""
    g = torch.Generator().manual_seed(0)
    d, eps = 16, 1e-6
    gain = 1 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    gain[0] = 1e-3  # a direction the norm nearly shuts

    def N(x):
        return gain * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    like = torch.randn(6, d, generator=g, dtype=torch.float64)
    y = N(3 * torch.randn(6, d, generator=g, dtype=torch.float64))  # another scale than like's: N forgets it
    torch.testing.assert_close(N(rms_norm_preimage(y, gain, eps, like)), y, rtol=1e-5, atol=1e-6)

    far = y + 2 * torch.randn(6, d, generator=g, dtype=torch.float64)
    x = rms_norm_preimage(far, gain, eps, like)
    near = N(x)
    c = like.pow(2).mean(-1, keepdim=True).sqrt()
    a2 = (gain * c / (c**2 + eps).sqrt()) ** 2  # (n, d)
    normal = near / a2
    mu = ((far - near) * normal).sum(-1, keepdim=True) / normal.pow(2).sum(-1, keepdim=True)
    torch.testing.assert_close(far - near, mu * normal, rtol=0, atol=1e-6)
    assert (a2.min(-1, keepdim=True).values + mu >= 0).all()
    torch.testing.assert_close(x.pow(2).mean(-1, keepdim=True).sqrt(), c)  # the scale is like's


@pytest.mark.parametrize("arch", POST_NORM)
def test_memit_through_the_post_mlp_norm_reproduces_a_reachable_target(models, stats, arch):
    """keys 'sequence', one layer = l_WM, almost no regularisation, z a hidden state the layer can produce (its
    down-projection output shifted at the hook positions): the edited weights reproduce z at l_WM; the llama-style
    update, which adds R = z - H(l_WM) to the down-projection output as it is, does not."""
    em = models(arch)
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 4)
    pos = seq.hook_positions
    with hooks.capture(em.down_proj(1), "output") as o:
        _, H = read_layer(em, 1, 1, seq.input_ids)
    o = o[0][0, pos]  # (n, d)
    shifts = o.norm(dim=-1, keepdim=True) * torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) / 8
    with shifted_output(em, 1, pos, shifts):
        _, H_z = read_layer(em, 1, 1, seq.input_ids)
    z = H_z[pos]

    def gap(editable):
        target = Target("r", seq, z)
        options = dict(mom2_update_weight=1e-6, solve_dtype="float64")
        update = compute_update(editable, [target], "memit", [1], stats=stats(arch), **options)
        with apply(em, update):
            _, H_after = read_layer(em, 1, 1, seq.input_ids)
        return ((z - H_after[pos]).norm() / (z - H[pos]).norm()).item()

    llama_style = EditableModel(em.model, em.tokenizer, dataclasses.replace(em.adapter, post_mlp_norm=None))
    mapped, plain = gap(em), gap(llama_style)
    print(f"\n{arch}: remaining gap to z, through the norm {mapped:.1e}, llama-style {plain:.2f}")
    assert mapped < 1e-4 and plain > 0.3


def test_unknown_architecture_and_missing_module_are_model_errors(models):
    with pytest.raises(ModelError, match="'gemma3' is not supported"):
        check_architecture("gemma3")  # the multimodal Gemma 3; its text-only checkpoints are gemma3_text
    em = models("gemma3_text")
    broken = EditableModel(em.model, em.tokenizer, dataclasses.replace(em.adapter, post_mlp_norm="mlp.post_norm"))
    with pytest.raises(ModelError, match="'gemma3_text'.*'mlp.post_norm'"):
        broken.post_mlp_norm(0)
