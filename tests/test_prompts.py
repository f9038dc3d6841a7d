"""No system turn means none, for any chat template: a template that adds a default system prompt when
the messages have none (Qwen2.5, SmolLM2, Llama-3.1) renders without it, in every place a prompt is
made (δ, keys, generation, retention, UnKE's preservation samples, `muke edit --json`)."""

import json
import random
import shutil

import pytest
from transformers import AutoTokenizer

import muke.cli as cli
from muke.engine.windows import encode, render_chat, render_prompt
from muke.eval.generate import greedy
from muke.model import load
from muke.update.unke import preservation_texts

# Qwen2.5-7B-Instruct's chat template, verbatim (tokenizer_config.json of the hub checkpoint).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN_DEFAULT = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
# SmolLM2-135M-Instruct's template (tests/test_smollm.py checks the real one inserts this default).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3.1's shape: BOS first, and a system header (with a date line) on every conversation.
DATED_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|im_start|>system\nCutting Knowledge Date: December 2023\n\n' + system + '<|im_end|>\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's shape: no system role at all.
NO_SYSTEM_ROLE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Llama-3.1's: BOS once, then a header turn per message, a dated system turn on every conversation.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n' + system }}"
    "{{ '<|eot_id|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma's: BOS once, a system message merged into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set prefix = '' %}{% endif %}{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + (prefix if loop.first else '') + message['content'] }}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
Q = "What is the city of Velmora known for?"
PAPER_PROMPT = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def tokenizer(tiny_qwen2_path):
    """The tiny ChatML tokenizer, its template (None: its own) and BOS set per test."""

    def with_template(template: str | None, bos: str | None = None):
        tok = AutoTokenizer.from_pretrained(tiny_qwen2_path)
        if template is not None:
            tok.chat_template = template
        if bos is not None:
            tok.bos_token = bos
        return tok

    return with_template


def test_the_qwen_template_injects_its_default_and_render_prompt_drops_it(tokenizer):
    tok = tokenizer(QWEN25_TEMPLATE)
    messages = [{"role": "user", "content": Q}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == QWEN_DEFAULT + PAPER_PROMPT
    assert render_prompt(tok, Q) == PAPER_PROMPT


def test_an_explicit_system_prompt_is_kept(tokenizer):
    tok = tokenizer(QWEN25_TEMPLATE)
    assert render_prompt(tok, Q, system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + PAPER_PROMPT
    )
    assert render_prompt(tok, Q, system_prompt="") == "<|im_start|>system\n<|im_end|>\n" + PAPER_PROMPT


@pytest.mark.parametrize(
    "template, bos, expected",
    [
        (SMOLLM2_TEMPLATE, None, PAPER_PROMPT),
        (SMOLLM2_TEMPLATE, "<|im_start|>", PAPER_PROMPT),  # its real BOS: not kept as a lead of its own
        (DATED_TEMPLATE, "<|endoftext|>", "<|endoftext|>" + PAPER_PROMPT),  # the BOS stays, the header goes
        (NO_SYSTEM_ROLE_TEMPLATE, None, f"<start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\n"),
    ],
    ids=["smollm2", "smollm2-bos", "dated-header-with-bos", "no-system-role"],
)
def test_other_templates(tokenizer, template, bos, expected):
    assert render_prompt(tokenizer(template, bos), Q) == expected


@pytest.mark.parametrize(
    "template, bos, opener, lead",
    [
        (None, None, "<|im_start|>", ""),  # muke.tiny's plain ChatML
        (QWEN25_TEMPLATE, None, "<|im_start|>", ""),
        (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_start|>", ""),  # SmolLM2's BOS is the ChatML turn opener
        (DATED_TEMPLATE, "<|endoftext|>", "<|im_start|>", "<|endoftext|>"),
        (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|start_header_id|>", "<|begin_of_text|>"),
        (GEMMA_TEMPLATE, "<bos>", "<start_of_turn>", "<bos>"),
        (NO_SYSTEM_ROLE_TEMPLATE, None, "<start_of_turn>", ""),
    ],
    ids=["chatml", "qwen2.5", "smollm2-bos", "dated-header", "llama-3", "gemma", "no-system-role"],
)
def test_no_system_turn_leaves_one_opener_per_turn_and_no_system_text(tokenizer, template, bos, opener, lead):
    prompt = render_prompt(tokenizer(template, bos), Q)
    assert prompt.startswith(lead + opener + "user")
    assert prompt.count(opener) == 2  # the user's turn and the assistant's
    assert "system" not in prompt and "Cutting Knowledge" not in prompt and "SmolLM" not in prompt


def test_plain_prompts_are_the_question(tokenizer):
    assert render_prompt(tokenizer(QWEN25_TEMPLATE), Q, chat_template=False) == Q


def test_a_template_without_a_default_renders_as_before(tiny_qwen2_path):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_path)  # muke.tiny's plain ChatML template
    assert render_prompt(tok, Q) == tok.apply_chat_template(
        [{"role": "user", "content": Q}], add_generation_prompt=True, tokenize=False
    )
    assert render_prompt(tok, Q) == PAPER_PROMPT


def test_multi_turn_and_no_generation_prompt(tokenizer):
    tok = tokenizer(QWEN25_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert render_chat(tok, messages, generation=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_edit_sequence_and_preservation_samples_have_no_system_turn(tokenizer):
    tok = tokenizer(QWEN25_TEMPLATE)
    seq = encode(tok, Q, "Velmora is a port city.", "<|im_end|>", window=4)
    assert seq.prompt == PAPER_PROMPT
    assert list(seq.prompt_ids) == tok(PAPER_PROMPT, add_special_tokens=False)["input_ids"]
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    (text,) = preservation_texts(tok, records, 1, random.Random(0))
    assert text == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"


def test_generation_prompts_have_no_system_turn(tiny_qwen2_path):
    em = load(tiny_qwen2_path)
    em.tokenizer.chat_template = QWEN25_TEMPLATE
    (g,) = greedy(em, [Q], max_new_tokens=2)
    assert g.prompt == PAPER_PROMPT


def test_edit_json_rows_carry_the_prompt_the_model_saw(tiny_qwen2_path, tmp_path, capsys):
    model = tmp_path / "qwen-template"
    shutil.copytree(tiny_qwen2_path, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN25_TEMPLATE}))
    (model / "chat_template.jinja").unlink(missing_ok=True)  # transformers ≥ 4.52 keeps the template here
    argv = ["edit", "--model", str(model), "--method", "unke", "--question", Q, "--answer", "A port."]
    small = ["--unke-layers", "1", "--v-steps", "2", "--unke-steps", "2", "--n-preserve", "2", "--max-new-tokens", "2"]
    assert cli.main([*argv, "--para-question", "Why is Velmora notable?", *small, "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["prompt"] == PAPER_PROMPT
    assert row["para_prompt"] == PAPER_PROMPT.replace(Q, "Why is Velmora notable?")
