"""Efficacy and integrity of single edits, per arm (docs/study/smollm2-8-integrity.md).

For each request and arm (a method plus preset overrides, e.g. key_position question), one edit from the
unedited model, then:
  efficacy   question / paraphrase char BLEU of the greedy answer (paper family), target NLL;
  fluency    repetition rate of the edited answer beside its target's (muke.eval.fluency);
  integrity  on unrelated chat prompts (resources/unrelated_prompts.jsonl: questions, instructions, code,
             arithmetic), against the unedited model's greedy answers: first-token agreement and KL,
             teacher-forced token agreement (muke.eval.retention.answer_shift), and exact match of the
             first --prefix-tokens greedy tokens.
Writes one JSON line per (request, arm) to --out and prints the per-arm means.

  python benchmarks/integrity_probe.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct \\
      --preset config/models/smollm2-135m-instruct.yaml --requests ../shared/data/unkebench/... \\
      --format unkebench --ids 10 11 --arm template: --arm question:key_position=question --out probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from muke.data import RESOURCES, jsonl_records, load_requests, select
from muke.editor import statistics as second_moments
from muke.engine.windows import chat_settings, encode
from muke.eval.fluency import repetition_rate
from muke.eval.generate import greedy
from muke.eval.metrics import char_bleu
from muke.eval.retention import answer_shift
from muke.model import load
from muke.result import questions
from muke.update.edit import edit, target_nll
from muke.update.methods import resolve_method
from muke.update.weights import apply


def parse_arm(text: str) -> tuple[str, dict]:
    """ "name:key=value,key=value" → (name, overrides), values read as YAML."""
    name, _, rest = text.partition(":")
    pairs = [kv.split("=", 1) for kv in rest.split(",") if kv]
    return name, {k: yaml.safe_load(v) for k, v in pairs}


def integrity(em, prompts: list[str], reference: list, update, chat: dict, prefix_tokens: int) -> dict:
    """First-token / token agreement and KL on `prompts`, and exact match of the first greedy tokens."""
    shift = answer_shift(em, prompts, [g.text for g in reference], update, **chat)
    with apply(em, update):
        post = greedy(em, prompts, max_new_tokens=prefix_tokens, batch_size=32, **chat)
    exact = [a.text == b.text for a, b in zip(reference, post)]
    return {
        "first_agreement": shift["first_agreement"],
        "first_kl": shift["first_kl"],
        "token_agreement": shift["answer_agreement"],
        "prefix_exact": 100.0 * sum(exact) / len(exact),
    }


def one_edit(em, r, method: str, preset: dict, chat: dict, stats, prompts, reference, args) -> dict:
    seq = encode(em.tokenizer, r.question, r.answer, em.end_of_turn, None, **chat)
    begin = time.perf_counter()
    torch.manual_seed(args.seed)
    update, results = edit(em, [r], method, preset, stats)
    seconds = time.perf_counter() - begin
    with apply(em, update):
        answers = greedy(em, questions(r), max_new_tokens=args.max_new_tokens, **chat)
        nll = target_nll(em, seq)
    row = {
        "id": r.id,
        "q_bleu": char_bleu(answers[0].text, r.answer),
        "para_bleu": char_bleu(answers[1].text, r.answer) if r.para_question else None,
        "nll_post": nll,
        "repetition": repetition_rate(answers[0].text),
        "target_repetition": repetition_rate(r.answer),
        "steps": sum(len(res.trace) for res in results),
        "seconds": seconds,
        "answer": answers[0].text,
    }
    return row | integrity(em, prompts, reference, update, chat, args.prefix_tokens)


def unedited_row(em, r, chat: dict, args) -> dict:
    """The unedited model's scores on a request: the reference for "paraphrase BLEU at least the unedited
    model's" and for the answers' repetition."""
    answers = greedy(em, questions(r), max_new_tokens=args.max_new_tokens, **chat)
    return {
        "arm": "unedited",
        "id": r.id,
        "q_bleu": char_bleu(answers[0].text, r.answer),
        "para_bleu": char_bleu(answers[1].text, r.answer) if r.para_question else None,
        "repetition": repetition_rate(answers[0].text),
        "target_repetition": repetition_rate(r.answer),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--format", default="unkebench")
    p.add_argument("--ids", nargs="+", required=True)
    p.add_argument("--method", default="muke-memit")
    p.add_argument("--arm", action="append", default=[], help="name:key=value,... preset overrides")
    p.add_argument("--unedited", action="store_true", help="also score the unedited model (arm 'unedited')")
    p.add_argument("--prompts", default=str(RESOURCES / "unrelated_prompts.jsonl"))
    p.add_argument("--n-prompts", type=int, default=120)
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    em = load(args.model)
    base = yaml.safe_load(Path(args.preset).read_text())["hparams"]
    requests = select(load_requests(args.requests, args.format), ids=args.ids)
    prompts = [r["question"] for r in jsonl_records(Path(args.prompts), ("id", "question"))][: args.n_prompts]
    out = Path(args.out)
    done = {(d["id"], d["arm"]) for d in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    if args.unedited:
        chat = chat_settings(resolve_method(args.method, base)[0])
        for r in (r for r in requests if (r.id, "unedited") not in done):
            with out.open("a") as f:
                f.write(json.dumps(unedited_row(em, r, chat, args), ensure_ascii=False) + "\n")
    for name, overrides in map(parse_arm, args.arm):
        preset = {**base, **overrides}
        memory, backend, options = resolve_method(args.method, preset)
        chat = chat_settings(memory)
        stats = second_moments(em, backend, options)  # with the template's C_t where template_weight > 0
        reference = greedy(em, prompts, max_new_tokens=args.prefix_tokens, batch_size=32, **chat)
        for r in requests:
            if (r.id, name) in done:
                continue
            row = {
                "arm": name,
                "method": args.method,
                **one_edit(em, r, args.method, preset, chat, stats, prompts, reference, args),
            }
            with out.open("a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "answer"}), flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for name in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == name]
        keys = ("q_bleu", "para_bleu", "repetition", "target_repetition", "first_agreement", "first_kl", "prefix_exact")
        means = {
            k: round(statistics.fmean(r[k] for r in mine if r.get(k) is not None), 3)
            for k in keys
            if mine[0].get(k) is not None
        }
        print(name, len(mine), means)


if __name__ == "__main__":
    main()
