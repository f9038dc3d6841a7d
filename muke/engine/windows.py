"""Edit request → token ids, windows and hook positions (docs/ALGORITHM.md §2).

Model input = prompt ++ target minus its last token (teacher forcing). Target token t is predicted
at position len(prompt) - 1 + t. The memory shift δ_i of window i sits on the token just before
the window: position len(prompt) - 1 + start_i (the last prompt token for i = 0).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError

log = logging.getLogger(__name__)

KEY_POSITIONS = ("template", "question")  # where window 0's memory sits: the prompt's last token, or the question's

# In-turn prefixes of the question's other renderings (MemoryConfig.renderings): MEMIT's context templates
# moved inside a chat model's user turn (docs/ALGORITHM.md §4). The question's own text, its last token included,
# stays as it is: with key_position "question" each rendering's first memory sits on the same text token.
RENDERING_PREFIXES = (
    "Question: ",
    "I have a question for you. ",
    "Please answer in detail. ",
    "Tell me what you know. ",
    "Answer the following question. ",
    "Here is something I would like to know. ",
    "Quick question: ",
)


@dataclass(frozen=True)
class EditSequence:
    """One request tokenized for editing.

    prompt_ids: chat-templated question; target_ids: answer + end-of-turn, no BOS;
    windows: (start, end) target-token ranges, consecutive, non-overlapping, covering the target.
    """

    prompt: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]
    first_hook: int | None = None  # δ_0's position; None: the prompt's last token (key position "template")
    renderings: tuple[EditSequence, ...] = ()  # the same request with the question rendered otherwise (same target)

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    @property
    def input_ids(self) -> torch.Tensor:
        """(1, len(prompt) + len(target) - 1): the teacher-forced model input."""
        return torch.tensor([self.prompt_ids + self.target_ids[:-1]])

    @property
    def target_positions(self) -> torch.Tensor:
        """Position at which each target token is predicted: (len(target),)."""
        return torch.arange(len(self.target_ids)) + len(self.prompt_ids) - 1

    @property
    def hook_positions(self) -> list[int]:
        """Position of δ_i for each window i: the token just before the window; for window 0 the prompt's
        last token, or `first_hook` (key position "question": the last token of the user's own text)."""
        positions = [len(self.prompt_ids) - 1 + start for start, _ in self.windows]
        if self.first_hook is not None:
            positions[0] = self.first_hook
        return positions

    def window_mask(self, i: int, j: int | None = None) -> torch.Tensor:
        """Bool mask over target tokens of windows i..j inclusive (j defaults to i): (len(target),)."""
        j = i if j is None else j
        mask = torch.zeros(len(self.target_ids), dtype=torch.bool)
        mask[self.windows[i][0] : self.windows[j][1]] = True
        return mask


def split_windows(n_tokens: int, window: int | None) -> tuple[tuple[int, int], ...]:
    """Consecutive windows of `window` tokens (last one may be shorter); None → one window."""
    if n_tokens < 1:
        raise ValueError("the target has no tokens")
    if window is None:
        return ((0, n_tokens),)
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    return tuple((s, min(s + window, n_tokens)) for s in range(0, n_tokens, window))


@functools.cache
def _note_plain_prompts(tokenizer_name: str) -> None:
    log.warning(
        "tokenizer %r has no chat template: prompts are the plain question (chat_template: false)", tokenizer_name
    )


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    """Whether prompts go through the chat template: as asked, except for a tokenizer that has none (gpt2),
    whose prompts are the plain question (chat_template: false), said once per tokenizer in the log."""
    if chat_template and not tokenizer.chat_template:
        _note_plain_prompts(tokenizer.name_or_path)
        return False
    return chat_template


SYSTEM_PROBE = "MUKE-SYSTEM-PROBE"  # a system message no template alters, to find where its turn lies


def _chat(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


@functools.cache
def _note_default_system(tokenizer_name: str) -> None:
    log.warning(
        "the chat template of %r adds a default system turn to messages without one: prompts are rendered "
        "without it (set hparams.system_prompt to keep a system turn)",
        tokenizer_name,
    )


def _template_lead(tokenizer, with_system: str, system_only: str) -> str:
    """The BOS token a template writes once before its first turn (Llama-3's <|begin_of_text|>), or "": also
    where BOS is the turn opener itself, which the next turn writes again (SmolLM2's <|im_start|>)."""
    bos = tokenizer.bos_token or ""
    if not bos or not (with_system.startswith(bos) and system_only.startswith(bos)):
        return ""
    return "" if with_system[len(system_only) :].startswith(bos) else bos


def without_system_turn(tokenizer, messages: list[dict], generation: bool = True) -> str:
    """`messages` (no system message among them) through the chat template with no system turn at all,
    also for a template that adds a default one when the messages have none (Qwen2.5's "You are Qwen,
    created by Alibaba Cloud…", SmolLM2's, Llama-3.1's dated header).

    The template's own turn for a probe system message is what `[system, *messages]` renders before the
    first message: lead + turn + rest, where lead is the BOS token the template writes first, if any, and
    turn is what `[system]` alone renders after that lead. lead + rest is the conversation without a
    system turn; it equals the plain rendering unless the template injected a default one. A template that
    refuses a system message, or that merges it into the first user turn (Gemma), cannot inject one of its
    own: it renders as it is.
    """
    plain = _chat(tokenizer, messages, generation)
    probe = {"role": "system", "content": SYSTEM_PROBE}
    try:
        with_system = _chat(tokenizer, [probe, *messages], generation)
        system_only = _chat(tokenizer, [probe], False)
    except TemplateError:  # the template refuses a system message (its raise_exception)
        return plain
    lead = _template_lead(tokenizer, with_system, system_only)
    turn = system_only[len(lead) :]
    if SYSTEM_PROBE not in turn or not with_system.startswith(lead + turn):
        return plain
    stripped = lead + with_system[len(lead + turn) :]
    if SYSTEM_PROBE in stripped or stripped == plain:
        return plain
    _note_default_system(tokenizer.name_or_path)
    return stripped


def render_chat(tokenizer, messages: list[dict], system_prompt: str | None = None, generation: bool = True) -> str:
    """A conversation through the chat template: with `system_prompt` as its system turn, or (None) with
    no system turn for any template (`without_system_turn`)."""
    if system_prompt is not None:
        return _chat(tokenizer, [{"role": "system", "content": system_prompt}, *messages], generation)
    return without_system_turn(tokenizer, messages, generation)


def plain_prompt(tokenizer, question: str) -> str:
    """The question as a prompt without a chat template, opened by the tokenizer's BOS token where its own
    encoding starts with one (Gemma, Llama; not gpt2): prompts are tokenized with add_special_tokens=False,
    and Gemma 3 answers a prompt without its <bos> with <eos> at once."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [bos]
    return tokenizer.bos_token + question if adds_bos else question


def chat_settings(settings) -> dict:
    """The chat settings of a run's hyperparameters (or resolved memory settings), as render_prompt takes
    them: {system_prompt (None: no system turn), chat_template (True: the tokenizer's template)}."""
    return {"system_prompt": settings.get("system_prompt"), "chat_template": settings.get("chat_template", True)}


def render_prompt(tokenizer, question: str, system_prompt: str | None = None, chat_template: bool = True) -> str:
    """The chat-templated question, ending where the assistant's answer starts: with `system_prompt` as
    the system turn, or (None) with none, as the paper's prompts have none even where the template would
    add a default one (Qwen2.5: `<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n`); the question
    as `plain_prompt` with chat_template false or a tokenizer without a template (`uses_chat_template`)."""
    if not uses_chat_template(tokenizer, chat_template):
        return plain_prompt(tokenizer, question)
    return render_chat(tokenizer, [{"role": "user", "content": question}], system_prompt)


def encode(
    tokenizer,
    question: str,
    answer: str,
    end_of_turn: str,
    window: int | None,
    system_prompt: str | None = None,
    chat_template: bool = True,
    key_position: str = "template",
    renderings: int = 1,
) -> EditSequence:
    """Tokenize a request: prompt via the chat template, target = answer + end-of-turn token; window 0's
    memory at the prompt's last token (key_position "template") or at the question's ("question"); with
    renderings k > 1 the question also behind the first k - 1 RENDERING_PREFIXES (EditSequence.renderings)."""
    if key_position not in KEY_POSITIONS:
        raise ValueError(f"key_position must be one of {KEY_POSITIONS}, got {key_position!r}")
    if not 1 <= renderings <= len(RENDERING_PREFIXES) + 1:
        raise ValueError(f"renderings must lie in 1..{len(RENDERING_PREFIXES) + 1}, got {renderings!r}")
    prompt = render_prompt(tokenizer, question, system_prompt, chat_template)
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"question {question!r} templates to no tokens")
    target_ids = tuple(tokenizer(answer + end_of_turn, add_special_tokens=False)["input_ids"])
    first_hook = question_end(tokenizer, prompt, prompt_ids, question) if key_position == "question" else None
    others = tuple(
        encode(tokenizer, prefix + question, answer, end_of_turn, window, system_prompt, chat_template, key_position)
        for prefix in RENDERING_PREFIXES[: renderings - 1]
    )
    return EditSequence(prompt, prompt_ids, target_ids, split_windows(len(target_ids), window), first_hook, others)


def question_end(tokenizer, prompt: str, prompt_ids: tuple[int, ...], question: str) -> int:
    """Index in `prompt_ids` of the last token of the user's own text: the question's last occurrence in
    the rendered prompt (templates may trim it), before the template's closing tokens ("<|im_end|>\n
    <|im_start|>assistant\n", "<|eot_id|>…", "<end_of_turn>\n<start_of_turn>model\n"); the prompt's last
    token for a plain prompt. The prompt's tokens up to there must be the tokens of its text up to there."""
    text = question.strip()
    at = prompt.rfind(text) if text else -1
    if at < 0:
        raise ValueError(f"question {question!r} does not appear in its rendered prompt {prompt!r}")
    head = tuple(tokenizer(prompt[: at + len(text)], add_special_tokens=False)["input_ids"])
    if not head or prompt_ids[: len(head)] != head:
        raise ValueError(
            f"question {question!r}: the prompt's tokens do not split at the question's end (a token spans the "
            "question and the template after it); key_position 'question' cannot place its memory there"
        )
    return len(head) - 1
