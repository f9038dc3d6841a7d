"""`muke export`: a model with weight updates ΔW applied, written with save_pretrained, with its model card
(muke.model_card.export_model)."""

from __future__ import annotations

from muke.cli.common import load_model, model_options


def cmd_export(args) -> None:
    from muke.model_card import export_model
    from muke.update.weights import WeightUpdate

    em = load_model(args)
    updates = [WeightUpdate.load(p) for p in args.updates]
    print(export_model(em, updates, args.out))


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model with weight updates ΔW applied (save_pretrained) and its model card"
    )
    model_options(p)
    p.add_argument("--updates", nargs="+", required=True, help="ΔW files (muke edit --out DIR writes DIR/updates/)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
