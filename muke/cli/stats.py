"""`muke stats`: second moments E[k kᵀ] of the down_proj inputs over a corpus (muke.update.stats)."""

from __future__ import annotations

from muke.cli.common import load_model, model_options


def cmd_stats(args) -> None:
    from muke.update.stats import StatsConfig, collect_stats

    em = load_model(args)
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


def add_parsers(sub) -> None:
    p = sub.add_parser("stats", help="second moments E[k kᵀ] of the down_proj inputs (resumable)")
    model_options(p)
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
