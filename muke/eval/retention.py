"""Locality that a small model can show: how much an edit changes what the model says and predicts
about things it was not asked to change.

SmolLM2-class models answer MMLU at chance, so an unchanged MMLU score proves little. Three measures
that do not need a capable model:

- answer retention: greedy answers to unrelated prompts of several kinds (questions, instructions, code,
  arithmetic: resources/unrelated_prompts.jsonl) after the edit, scored against the model's own answers
  before it (`answer_retention`, `edit_retention`), and whether their first tokens are the same
  (`prefix_exact`);
- text shift: the per-token KL(pre ‖ post) of next-token distributions and the perplexity before and
  after, on held-out texts (`text_shift`, texts from `held_out_texts`);
- answer shift: the same KL and the top-1 agreement teacher-forced on the unedited answers, at the
  prompt's last token and inside the answer (`answer_shift`): where greedy answers diverge, untangled
  from the cascade that follows the first changed token.

The locality stage uses all three through `reference` (the unedited model's answers, once per job) and
`locality_rows` (one model state's rows in the layout of muke.eval.locality, plus per-question samples).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from muke.data import DEMO_CORPUS, RESOURCES, jsonl_records
from muke.engine.windows import chat_settings, render_prompt
from muke.eval.generate import greedy
from muke.eval.metrics import char_bleu, word_bleu
from muke.model import EditableModel, pad
from muke.update.corpus import load_corpus
from muke.update.weights import WeightUpdate, apply

UNRELATED_QUESTIONS = RESOURCES / "unrelated_questions.jsonl"
UNRELATED_PROMPTS = RESOURCES / "unrelated_prompts.jsonl"  # the locality stage's default
Updates = WeightUpdate | Sequence[WeightUpdate]
# answer_retention's per-pair key -> the metric name of a locality row (task "retention")
ANSWER_METRICS = {"char_bleu": "answer_char_bleu", "word_bleu": "answer_word_bleu", "exact": "answer_exact_match"}


def unrelated_questions(path: str | Path = UNRELATED_QUESTIONS) -> list[dict]:
    """Records {"id", "question", "kind"} of a JSONL file (kind "question" where a record has none); by
    default the project's own general-knowledge questions, written to share no topic with any demo edit
    or preservation sample. UNRELATED_PROMPTS: 120 chat prompts, 30 of each kind (question, instruction,
    code, arithmetic), interleaved, so that a file's first N hold every kind."""
    return [{"kind": "question", **r} for r in jsonl_records(Path(path), ("id", "question"))]


def held_out_texts(n: int = 32, path: str | Path = DEMO_CORPUS) -> list[str]:
    """The first `n` documents of a corpus read as the statistics stage reads it (muke.update.corpus.load_corpus:
    a .txt of blank-line separated documents, or JSONL with a "text" field).

    The default, resources/demo_corpus.txt, is held out from the EDITS only: it is also the demo's
    covariance corpus and the tiny models' pretraining text. For a real run pass texts that neither the
    model nor the update's statistics saw.
    """
    return load_corpus(path)[0][:n]


def answer_retention(pre: Sequence[str], post: Sequence[str]) -> dict:
    """Post-edit answers scored against the pre-edit answers to the same questions, ×100.

    Returns {"char_bleu": mean paper-family char BLEU, "word_bleu": mean sacrebleu BLEU, "exact_match":
    % of pairs equal after stripping, "n": pairs, "rows": [{index, pre, post, char_bleu, word_bleu, exact}]}.
    Means are NaN for no pairs.
    """
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre-edit answers for {len(post)} post-edit answers")
    rows = [
        dict(index=i, pre=a, post=b, char_bleu=char_bleu(b, a), word_bleu=word_bleu(b, a), exact=a.strip() == b.strip())
        for i, (a, b) in enumerate(zip(pre, post))
    ]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows) if rows else math.nan

    return {
        "char_bleu": mean("char_bleu"),
        "word_bleu": mean("word_bleu"),
        "exact_match": 100.0 * mean("exact"),
        "n": len(rows),
        "rows": rows,
    }


def prefix_exact(tokenizer, pre: Sequence[str], post: Sequence[str], n_tokens: int) -> list[bool]:
    """Per pair of answers, whether their first `n_tokens` tokens (each answer tokenised on its own) are
    equal; an answer shorter than that matches only an answer that ends where it does."""
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre-edit answers for {len(post)} post-edit answers")
    if not pre:
        return []
    ids = tokenizer([*pre, *post], add_special_tokens=False)["input_ids"]
    return [a[:n_tokens] == b[:n_tokens] for a, b in zip(ids[: len(pre)], ids[len(pre) :])]


def edit_retention(em: EditableModel, update: Updates, questions: Sequence[str] | None = None, **greedy_kwargs) -> dict:
    """`answer_retention` of greedy answers to `questions` (default: `unrelated_questions()`) given by the
    unedited model, then inside apply(em, update); rows also carry the question. greedy_kwargs: as
    muke.eval.generate.greedy (max_new_tokens, batch_size, ...)."""
    if questions is None:
        questions = [r["question"] for r in unrelated_questions()]
    questions = list(questions)
    pre = [g.text for g in greedy(em, questions, **greedy_kwargs)]
    with apply(em, update):
        post = [g.text for g in greedy(em, questions, **greedy_kwargs)]
    result = answer_retention(pre, post)
    for row, question in zip(result["rows"], questions):
        row["question"] = question
    return result


@torch.no_grad()
def _log_probs(em: EditableModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of the next-token logits at positions 0..T-2: (batch, T-1, vocab)."""
    logits = em.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _pre_post(em: EditableModel, sequences: list[list[int]], update: Updates | None, batch_size: int):
    """Per batch of token sequences (right-padded): (start, ids, mask, pre, post), the `_log_probs` of the
    unedited model and inside apply(em, update) (post = pre for update None)."""
    for start in range(0, len(sequences), batch_size):
        ids, mask = (t.to(em.device) for t in pad(sequences[start : start + batch_size], em.pad_id))
        pre = _log_probs(em, ids, mask)  # (B, T-1, V)
        if update is None:
            post = pre
        else:
            with apply(em, update):
                post = _log_probs(em, ids, mask)
        yield start, ids, mask, pre, post


def _kl(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """KL(p_pre ‖ p_post) per position from log-probabilities: (..., V) -> (...)."""
    p = pre.exp()
    return torch.where(p > 0, p * (pre - post), 0.0).sum(-1)


@torch.no_grad()
def text_shift(
    em: EditableModel, texts: Sequence[str], update: Updates | None = None, batch_size: int = 4, max_length: int = 256
) -> dict:
    """How much an update changes next-token predictions on `texts`.

    Each text is tokenised as the statistics stage does (special tokens as the tokenizer adds them,
    truncated to `max_length`); every position t with a real next token counts once (n_tokens in all):
      kl       = mean over those positions of KL(p_pre ‖ p_post) = Σ_v p_pre(v) (log p_pre(v) − log p_post(v)),
      ppl_pre  = exp(mean NLL of the next token, unedited), ppl_post the same inside apply(em, update).
    Batches are right-padded with an attention mask and padded positions excluded, so the batch size
    changes nothing beyond fp32 rounding. Each batch runs once unedited and once inside apply(em, update),
    which restores the weights bit-exactly after it. update None: post = pre (kl 0, equal perplexities).
    """
    encoded = [x for x in em.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if len(x) >= 2]
    kl = nll_pre = nll_post = 0.0
    n_tokens = 0
    for _, ids, mask, pre, post in _pre_post(em, encoded, update, batch_size):
        valid = mask[:, 1:].bool()  # (B, T-1): next token is real
        nexts = ids[:, 1:, None]  # (B, T-1, 1)
        kl += _kl(pre, post)[valid].double().sum().item()
        nll_pre -= pre.gather(-1, nexts)[..., 0][valid].double().sum().item()
        nll_post -= post.gather(-1, nexts)[..., 0][valid].double().sum().item()
        n_tokens += int(valid.sum())
    if not n_tokens:
        return {"kl": math.nan, "ppl_pre": math.nan, "ppl_post": math.nan, "n_tokens": 0}
    return {
        "kl": kl / n_tokens,
        "ppl_pre": math.exp(nll_pre / n_tokens),
        "ppl_post": math.exp(nll_post / n_tokens),
        "n_tokens": n_tokens,
    }


@torch.no_grad()
def answer_shift(
    em: EditableModel,
    questions: Sequence[str],
    answers: Sequence[str],
    update: Updates | None = None,
    batch_size: int = 32,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> dict:
    """Teacher-forced drift on the unedited model's own answers: where the edit changes the next-token
    prediction, without greedy decoding's cascade (one changed token changes every later one).

    Each question's chat prompt (render_prompt, as greedy answers it) is followed by its unedited answer
    (tokenised on its own, as a request's target is). At the prompt's last token, which predicts the
    answer's first token (and is the same template token, e.g. ChatML's "assistant\\n", in every chat
    prompt), and at every answer position that predicts the next answer token:
      first_kl / answer_kl  = mean KL(p_pre ‖ p_post) over those positions, nats,
      first_agreement / answer_agreement = % of them where argmax p_post = argmax p_pre.
    n: questions; n_tokens: answer positions; first_kls / first_agreements: per question, its first-token
    KL and agreement (True / False). update None: post = pre (kl 0, agreement 100).
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
    tok = em.tokenizer
    prompts = [
        tok(render_prompt(tok, q, system_prompt, chat_template), add_special_tokens=False)["input_ids"]
        for q in questions
    ]
    targets = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    sums = {"answer_kl": 0.0, "answer_agreement": 0.0}
    first_kls, first_agreements, n_tokens = [], [], 0
    sequences = [a + b for a, b in zip(prompts, targets)]
    for start, _, _, pre, post in _pre_post(em, sequences, update, batch_size):
        kl = _kl(pre, post).double()  # (B, T-1)
        agree = (pre.argmax(-1) == post.argmax(-1)).double()
        for i, (a, b) in enumerate(zip(prompts[start : start + batch_size], targets[start : start + batch_size])):
            first, answer = len(a) - 1, slice(len(a), len(a) + len(b) - 1)
            first_kls.append(kl[i, first].item())
            first_agreements.append(bool(agree[i, first].item()))
            sums["answer_kl"] += kl[i, answer].sum().item()
            sums["answer_agreement"] += agree[i, answer].sum().item()
            n_tokens += max(len(b) - 1, 0)
    n = len(prompts)
    return {
        "first_kl": sum(first_kls) / n if n else math.nan,
        "first_agreement": 100 * sum(first_agreements) / n if n else math.nan,
        "answer_kl": sums["answer_kl"] / n_tokens if n_tokens else math.nan,
        "answer_agreement": 100 * sums["answer_agreement"] / n_tokens if n_tokens else math.nan,
        "n": n,
        "n_tokens": n_tokens,
        "first_kls": first_kls,
        "first_agreements": first_agreements,
    }


# ---------------------------------------------------------------------------- the locality stage's rows


@dataclass
class Reference:
    """What every model state of one locality job is compared with: the unedited model's answers."""

    settings: dict  # the config's locality.retention
    ids: list[str]  # question ids
    questions: list[str]
    answers: list[str]  # the unedited model's greedy answers
    texts: list[str]  # held-out texts of the text shift
    kinds: list[str]  # each prompt's kind (question, instruction, code, arithmetic)


def _answers(em: EditableModel, questions: list[str], settings: dict) -> list[str]:
    batch = dict(max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"])
    return [g.text for g in greedy(em, questions, **batch, **chat_settings(settings))]


def reference(em: EditableModel, settings: dict) -> Reference:
    """Prompts, texts and the unedited model's answers (em must be unedited) for `settings` =
    {questions, n_questions, max_new_tokens, prefix_tokens, batch_size, texts, text_file, ...}; a null
    file is muke's own (UNRELATED_PROMPTS, the demo corpus)."""
    records = unrelated_questions(settings["questions"] or UNRELATED_PROMPTS)[: settings["n_questions"]]
    questions = [r["question"] for r in records]
    texts = held_out_texts(settings["texts"], settings["text_file"] or DEMO_CORPUS)
    answers = _answers(em, questions, settings)
    return Reference(settings, [r["id"] for r in records], questions, answers, texts, [r["kind"] for r in records])


def _score_row(metric: str, values: list[float], scale: float, task: str = "retention") -> dict:
    """Mean of per-question scores (×scale) ± their standard error."""
    n = len(values)
    return dict(
        task=task,
        metric=metric,
        value=statistics.fmean(values) * scale if n else math.nan,
        stderr=statistics.stdev(values) / math.sqrt(n) * scale if n > 1 else None,
        n_samples=n,
    )


def _per_question_rows(result: dict, drift: dict, prefix: list[bool]) -> list[dict]:
    """The rows averaged over questions: answer retention, first-token agreement and KL, prefix match."""
    rows = [
        _score_row(metric, [float(r[key]) for r in result["rows"]], 1 / 100 if key != "exact" else 1)
        for key, metric in ANSWER_METRICS.items()
    ]
    return rows + [
        _score_row("first_token_agreement", [float(a) for a in drift["first_agreements"]], 1),
        _score_row("prefix_exact_match", [float(m) for m in prefix], 1),
        _score_row("first_token_kl", drift["first_kls"], 1, task="text_shift"),
    ]


def _per_token_rows(shift: dict, drift: dict) -> list[dict]:
    """The rows averaged over tokens: text shift (kl, ppl) and teacher-forced answer drift."""
    return [
        dict(task=task, metric=metric, value=value, stderr=None, n_samples=n)
        for task, metric, value, n in (
            ("text_shift", "kl", shift["kl"], shift["n_tokens"]),
            ("text_shift", "ppl", shift["ppl_post"], shift["n_tokens"]),
            ("retention", "token_agreement", drift["answer_agreement"] / 100, drift["n_tokens"]),
            ("text_shift", "answer_kl", drift["answer_kl"], drift["n_tokens"]),
        )
    ]


def _kind_rows(kinds: list[str], drift: dict, prefix: list[bool]) -> list[dict]:
    """First-token agreement and prefix match per prompt kind, as metrics "first_token_agreement (code)"
    etc.; none where every prompt is of one kind."""
    if len(set(kinds)) < 2:
        return []
    return [
        _score_row(f"{metric} ({kind})", [float(v) for v, k in zip(values, kinds) if k == kind], 1)
        for kind in dict.fromkeys(kinds)
        for metric, values in (("first_token_agreement", drift["first_agreements"]), ("prefix_exact_match", prefix))
    ]


def locality_rows(
    em: EditableModel, ref: Reference, model_state: str, request_id: str | None = None, update: Updates | None = None
) -> tuple[list[dict], list[dict]]:
    """(rows, samples) of one model state: the unedited model (update None, the reference itself: scores
    1, kl 0) or the model inside apply(em, update).

    rows {model_state, request_id, task, metric, value, stderr, n_samples}: task "retention", metrics
    answer_char_bleu / answer_word_bleu / answer_exact_match as fractions 0–1 like lm-eval's acc (the
    report shows ×100), stderr over questions, n_samples questions; prefix_exact_match, the share of
    answers whose first min(prefix_tokens, max_new_tokens) tokens are the unedited answer's
    (`prefix_exact`); task "text_shift", metrics kl (nats per token) and ppl (the state's perplexity),
    n_samples tokens; `answer_shift` on the unedited answers: task "retention" first_token_agreement /
    token_agreement (fractions), task "text_shift" first_token_kl / answer_kl (nats); with prompts of
    several kinds, first_token_agreement and prefix_exact_match per kind (`_kind_rows`). samples: one per
    question {model_state, request_id, id, kind, question, pre, post, char_bleu, word_bleu, exact, prefix_exact}.
    """
    s = ref.settings
    if update is None:
        post = list(ref.answers)
    else:
        with apply(em, update):
            post = _answers(em, ref.questions, s)
    result = answer_retention(ref.answers, post)
    prefix = prefix_exact(em.tokenizer, ref.answers, post, min(s["prefix_tokens"], s["max_new_tokens"]))
    shift = text_shift(em, ref.texts, update, batch_size=s["text_batch_size"], max_length=s["max_length"])
    drift = answer_shift(em, ref.questions, ref.answers, update, batch_size=s["batch_size"], **chat_settings(s))
    state = dict(model_state=model_state, request_id=request_id)
    found = _per_question_rows(result, drift, prefix) + _per_token_rows(shift, drift)
    rows = [{**state, **row} for row in found + _kind_rows(ref.kinds, drift, prefix)]
    samples = [
        {
            **state,
            "id": i,
            "kind": k,
            "question": q,
            **{c: r[c] for c in ("pre", "post", *ANSWER_METRICS)},
            "prefix_exact": m,
        }
        for i, k, q, r, m in zip(ref.ids, ref.kinds, ref.questions, result["rows"], prefix)
    ]
    return rows, samples
