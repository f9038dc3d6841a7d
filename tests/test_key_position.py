"""Key position "question": window 0's memory sits on the last token of the user's own text, before the chat
template's closing tokens, for ChatML (Qwen, SmolLM2), Llama-3, Gemma and plain prompts."""

import pytest
from transformers import AutoTokenizer

from muke.engine.windows import encode

Q = "What is the city of Velmora known for?"
A = "Velmora is known for its glass bridges."
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<bos>"]
# template name: (chat template or None for the tiny model's own ChatML, BOS token, template's closing text)
TEMPLATES = {
    "chatml": (None, None, "<|im_end|>\n<|im_start|>assistant\n"),
    "smollm2-bos": (None, "<|im_start|>", "<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": (GEMMA_TEMPLATE, "<bos>", "<end_of_turn>\n<start_of_turn>model\n"),
}


@pytest.fixture(scope="module")
def base_tokenizer(tiny_qwen2_path):
    return tiny_qwen2_path


def tokenizer_for(path, name: str):
    template, bos, _ = TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS + ["<|begin_of_text|>"]})
    if template is not None:
        tok.chat_template = template
    if bos is not None:
        tok.bos_token = bos
    return tok


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
def test_the_first_memory_sits_on_the_questions_last_token(base_tokenizer, name, system_prompt):
    if name == "gemma" and system_prompt:
        pytest.skip("the Gemma template refuses a system turn")
    tok = tokenizer_for(base_tokenizer, name)
    template = encode(tok, Q, A, tok.eos_token, 4, system_prompt)
    question = encode(tok, Q, A, tok.eos_token, 4, system_prompt, key_position="question")
    assert question.prompt_ids == template.prompt_ids and question.windows == template.windows
    first = question.hook_positions[0]
    assert tok.decode(question.prompt_ids[: first + 1]).endswith(Q)
    assert tok.decode(question.prompt_ids[first + 1 :]) == TEMPLATES[name][2]
    assert template.hook_positions[0] == len(template.prompt_ids) - 1
    assert question.hook_positions[1:] == template.hook_positions[1:]


def test_a_plain_prompt_keeps_its_last_token(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, "chatml")
    seq = encode(tok, Q, A, tok.eos_token, 4, chat_template=False, key_position="question")
    assert seq.hook_positions[0] == len(seq.prompt_ids) - 1


def test_an_unknown_key_position_is_refused(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, "chatml")
    with pytest.raises(ValueError, match="key_position must be one of"):
        encode(tok, Q, A, tok.eos_token, 4, key_position="answer")
