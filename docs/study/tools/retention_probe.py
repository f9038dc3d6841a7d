"""Why does answer retention stay low? Where an edit changes the model's answers to unrelated questions.

For each μKE/AnyEdit (MEMIT) memories shard of a workflow run (results/.../memories/<id>.safetensors):
the shard's requests are edited one at a time (the update stage's backend on the shard's own targets)
and the unedited model's greedy answers to the unrelated questions (resources/unrelated_questions.jsonl)
are compared with the edited model's:

- greedy: char BLEU and exact match of the answers (the locality stage's measure), and the index of the
  first answer token that differs (median over questions);
- teacher-forced on [chat prompt + unedited answer]: mean KL(p_unedited ‖ p_edited) and top-1 agreement
  at three groups of positions: inside the prompt, at the prompt's last token (which predicts the first
  answer token and is the same template token, "assistant\\n", in every chat prompt — and the hook
  position of every request's first window), and inside the answer;
- controls with the same ‖ΔW_l‖_F per layer: "random" (random rank-1 U Vᵀ: a generic perturbation of that
  size) and "same-keys" (the edit's V, random U: the same input directions, random outputs).

Statistics: the demo corpus as the workflow's (`--stats-corpus`), optionally each document rendered as a
chat exchange (`--chat-stats`: first sentence as the user turn, the rest as the assistant's answer) so
that C holds the chat template's keys too.

  python docs/study/tools/retention_probe.py MODEL MEMORIES.safetensors... --out OUT.csv [--chat-stats]
"""

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch

from muke.data import DEMO_CORPUS
from muke.engine.windows import render_prompt
from muke.eval.generate import greedy
from muke.eval.metrics import char_bleu
from muke.eval.retention import answer_retention, unrelated_questions
from muke.model import load, pad
from muke.update.corpus import load_corpus
from muke.update.edit import compute_update
from muke.update.methods import resolve_method
from muke.update.stats import StatsConfig, cached_stats
from muke.update.weights import WeightUpdate, apply
from muke.workflow.config import load_preset
from muke.workflow.stages.update_weights import targets

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("memories", nargs="+")
p.add_argument("--out", required=True)
p.add_argument("--method", default="muke-memit")
p.add_argument("--preset", default="smollm2-135m-instruct")
p.add_argument("--mom2", type=float, nargs="+", default=[300.0])
p.add_argument("--stats-corpus", default=str(DEMO_CORPUS))
p.add_argument("--chat-stats", action="store_true")
p.add_argument("--controls", action="store_true", help="also the same-norm random controls")
p.add_argument("--limit", type=int, default=None, help="requests per shard")
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

em = load(args.model, "float32", "cpu")
hparams = load_preset(args.preset)[1]["hparams"]
_, backend, options = resolve_method(args.method, hparams)
questions = [r["question"] for r in unrelated_questions()]


def chat_corpus(path: str) -> str:
    """A JSONL corpus: each document as [user: first sentence, assistant: the rest], chat-templated."""
    out = Path(tempfile.gettempdir()) / f"chat-{Path(path).stem}.jsonl"
    with open(out, "w") as f:
        for doc in load_corpus(path)[0]:
            first, *rest = re.split(r"(?<=[.!?])\s+", doc.strip(), maxsplit=1)
            text = render_prompt(em.tokenizer, first) + (rest[0] if rest else first) + "<|im_end|>\n"
            f.write(json.dumps({"text": text}) + "\n")
    return str(out)


corpus = chat_corpus(args.stats_corpus) if args.chat_stats else args.stats_corpus
stats = cached_stats(em, StatsConfig(layers=tuple(options["layers"]), corpus=corpus))

prompts = [render_prompt(em.tokenizer, q) for q in questions]
pre = greedy(em, questions, max_new_tokens=64, batch_size=32)
prompt_ids = [em.tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
answer_ids = [em.tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in pre]


@torch.no_grad()
def log_probs() -> torch.Tensor:
    ids, mask = pad([a + b for a, b in zip(prompt_ids, answer_ids)], em.pad_id)
    return torch.log_softmax(em.model(input_ids=ids, attention_mask=mask).logits.float(), -1)


def groups() -> dict[str, torch.Tensor]:
    """Boolean (batch, T) masks of the predicting positions: prompt (but its last), last prompt, answer."""
    T = max(len(a) + len(b) for a, b in zip(prompt_ids, answer_ids))
    masks = {k: torch.zeros(len(prompts), T, dtype=torch.bool) for k in ("prompt", "last", "answer")}
    for i, (a, b) in enumerate(zip(prompt_ids, answer_ids)):
        masks["prompt"][i, : len(a) - 1] = True
        masks["last"][i, len(a) - 1] = True
        masks["answer"][i, len(a) : len(a) + len(b) - 1] = True
    return masks


lp_pre, masks = log_probs(), groups()


def first_divergence(a: str, b: str) -> int:
    x, y = (em.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    return next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))


def measure(update: WeightUpdate, target) -> dict:
    answer = em.tokenizer.decode(target.seq.target_ids, skip_special_tokens=True)
    n_new = len(target.seq.target_ids) + 40
    with apply(em, update):
        q = greedy(em, [target.seq.prompt], max_new_tokens=n_new, chat_template=False)[0].text
        post = greedy(em, questions, max_new_tokens=64, batch_size=32)
        lp_post = log_probs()
    ret = answer_retention([g.text for g in pre], [g.text for g in post])
    kl = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)
    agree = lp_pre.argmax(-1) == lp_post.argmax(-1)
    row = dict(q_bleu=char_bleu(q, answer), retention_char_bleu=ret["char_bleu"], retention_exact=ret["exact_match"])
    row["first_divergence_median"] = statistics.median(first_divergence(g.text, h.text) for g, h in zip(pre, post))
    for k, m in masks.items():
        row[f"kl_{k}"] = kl[m].mean().item()
        row[f"top1_{k}"] = 100 * agree[m].float().mean().item()
    return row


def control(update: WeightUpdate, keep_keys: bool) -> WeightUpdate:
    """Same ‖ΔW_l‖_F per layer: random rank-1, or the edit's V with random U of the same column norms."""
    factors = {}
    for layer, (U, V) in update.factors.items():
        norm = (U @ V.T).norm()
        if keep_keys:
            R = torch.randn_like(U)
            R = R / R.norm(dim=0) * U.norm(dim=0)
            factors[layer] = (R * norm / (R @ V.T).norm(), V)
        else:
            u, v = torch.randn(U.shape[0], 1), torch.randn(V.shape[0], 1)
            factors[layer] = (u * norm / (u.norm() * v.norm()), v)
    return WeightUpdate(update.method, update.backend, update.layers, update.request_ids, factors)


rows = []
for path in args.memories:
    found, _ = targets(path)
    for target in found[: args.limit]:
        for mom2 in args.mom2:
            update = compute_update(
                em,
                [target],
                backend,
                stats=stats,
                method=args.method,
                **{**options, **({"mom2_update_weight": mom2} if backend == "memit" else {})},
            )
            for kind, u in (("edit", update), ("random", control(update, False)), ("same-keys", control(update, True)))[
                : 3 if args.controls else 1
            ]:
                row = dict(
                    id=target.id,
                    memories=Path(path).stem,
                    stats="chat" if args.chat_stats else "plain",
                    mom2=mom2,
                    kind=kind,
                    method=args.method,
                    **measure(u, target),
                )
                rows.append(row)
                print(row, flush=True)
                pd.DataFrame(rows).to_csv(args.out, index=False)
